"""pretrain: continued pretraining of the base model on the packed corpus blocks.

Reads `models/base/` and `data/tokenized/`; trains with next-token loss in a plain PyTorch loop
under `accelerate` (full or LoRA, merged), so the same loop runs on one CPU and under FSDP or
DeepSpeed. Writes `models/pretrain/` and `reports/pretrain/` (`metrics.json`: held-out perplexity
before and after, tokens/s, `resumed_from_step`; `curves.csv`).

    python -m stages.pretrain [--params params.yaml] [--no-mlflow]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common.blocks import evaluate, load_blocks, loader, micro_batches, perplexity
from stages.common.config import Paths, StageConfig, StageError
from stages.common.runner import run_stage
from stages.common.training import (
    STATE_FILE,
    Checkpoints,
    Curves,
    Lora,
    TrainConfig,
    count_parameters,
    peak_flops,
    peft_config,
    resolve_precision,
    restore_curves,
    rounded,
    save_model,
    seed_everything,
    threads,
)

log = logging.getLogger("llm_forge.pretrain")



class PretrainConfig(StageConfig):
    """The `pretrain` section: what continued pretraining does (how it runs: the `train` section)."""

    method: Literal["full", "lora"]
    """full: every weight trains; lora: adapters (`lora`), merged into a plain model before saving."""
    lora: Lora
    """The adapters, when `method` is lora."""
    max_steps: int = Field(ge=1)
    """Optimizer steps to train for (the data repeats, reshuffled, when it runs out)."""
    batch_size: int = Field(ge=1)
    """Blocks per micro-batch on each process."""
    gradient_accumulation_steps: int = Field(ge=1)
    """Micro-batches per optimizer step (tokens per step: batch_size x this x processes x block)."""
    learning_rate: float = Field(gt=0)
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    """Decay after warmup (`transformers.get_scheduler` name)."""
    warmup_ratio: float = Field(ge=0, lt=1)
    """Share of the steps spent warming up linearly from 0 to learning_rate."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay, applied to matrices only (not to norms or biases)."""
    betas: tuple[float, float]
    """AdamW beta1, beta2."""
    max_grad_norm: float = Field(ge=0)
    """Clip the global gradient norm to this (0: no clipping; the norm is still logged)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass: less memory, more compute."""
    compile: bool
    """`torch.compile` the model (worth it on GPU; the first step compiles for a while)."""
    shuffle: bool
    """Shuffle the train blocks (a fresh seeded order each pass over the data)."""
    seed: int
    """Seed of the adapters' init, dropout and the data order."""
    logging_steps: int = Field(ge=1)
    """Write train loss, lr, tokens/s and grad norm to the curves every this many steps."""
    eval_steps: int = Field(ge=0)
    """Val loss into the curves every this many steps (0: only before and after training)."""
    eval_batches: int = Field(ge=0)
    """Val micro-batches per evaluation (0: no perplexity)."""
    save_steps: int = Field(ge=0)
    """Resumable checkpoint every this many steps (0: none)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Dtype of the saved weights; auto: the dtype the base model was saved in."""


# ---------------------------------------------------------------------------------------------
# model


def load_model(paths: Paths, cfg: PretrainConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(cfg.lora, "CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model: Any, cfg: PretrainConfig, device_type: str) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # Fused AdamW (one kernel for all parameters) exists for CUDA and CPU; transformers.Trainer
    # uses it by default too.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=cfg.betas,
                             fused=True if device_type in ("cuda", "cpu") else None)


def plain_model(accelerator: Any, model: Any, paths: Paths, cfg: PretrainConfig) -> Any:
    """The trained weights as a plain transformers model (adapters merged), on the main process;
    None on the others. Every process must call it (gathering sharded weights is collective)."""
    if accelerator.num_processes > 1:
        state = accelerator.get_state_dict(model)  # full weights, gathered onto the main process
        if not accelerator.is_main_process:
            return None
        ds = accelerator.state.deepspeed_plugin
        # A plain copy on this process alone: ZeRO-3's partitioned init would wait for the others.
        with ds.zero3_init_context_manager(enable=False) if ds is not None else contextlib.nullcontext():
            plain = load_model(paths, cfg.model_copy(update={"gradient_checkpointing": False}))
        plain.load_state_dict(state)
    else:
        plain = accelerator.unwrap_model(model)
        if cfg.gradient_checkpointing:
            plain.gradient_checkpointing_disable()
    if cfg.method == "lora":
        plain = plain.merge_and_unload()
    plain.config.use_cache = True
    return plain.to("cpu")


def save_dtype(cfg: PretrainConfig, paths: Paths) -> Any:
    import torch

    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    stored = json.loads((Path(paths.base) / "config.json").read_text()).get("dtype") or "float32"
    return getattr(torch, stored) if isinstance(getattr(torch, stored, None), torch.dtype) else torch.float32


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class Setup:
    """What `run` prepares before the first step."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_ds: Any
    val_loader: Any
    batch_tokens: int
    """Tokens of one micro-batch on one process."""
    precision: str
    sizes: dict[str, int]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_tokens * self.accelerator.num_processes * self.accelerator.gradient_accumulation_steps


def setup(cfg: PretrainConfig, paths: Paths, train: TrainConfig) -> Setup:
    """The checked blocks, the accelerator, the model, AdamW and its schedule, all prepared."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin
    from transformers import AutoConfig, get_scheduler

    for folder, stage in ((paths.base, "base"), (paths.tokenized, "tokenize")):
        if not Path(folder).exists():
            raise StageError(f"{folder} does not exist (run the {stage} stage first)")
    try:
        model_config = AutoConfig.from_pretrained(paths.base)
    except (OSError, ValueError) as err:
        raise StageError(f"{paths.base} is not a model folder: {err}") from None
    dsd = load_blocks(paths, model_config)
    train_ds, val_ds = dsd["train"], dsd["val"]
    precision = resolve_precision(train.precision)
    accelerator = Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        dynamo_backend="inductor" if cfg.compile else "no")
    if len(train_ds) < cfg.batch_size * accelerator.num_processes:
        raise StageError(f"{paths.tokenized} has {len(train_ds)} train blocks, fewer than one batch "
                         f"({cfg.batch_size} x {accelerator.num_processes} processes): lower pretrain.batch_size")
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants it before prepare()
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    seed_everything(cfg.seed)
    model = load_model(paths, cfg)
    sizes = count_parameters(model)
    optimizer = make_optimizer(model, cfg, accelerator.device.type)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * cfg.max_steps),
                              num_training_steps=cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is ours to step once per optimizer step (accelerate would step it once per
    # process); registered so that save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)
    val_loader = (accelerator.prepare_data_loader(loader(val_ds, cfg.batch_size, None, drop_last=False))
                  if len(val_ds) else None)
    return Setup(accelerator, model, optimizer, scheduler, train_ds, val_loader,
                 cfg.batch_size * len(train_ds[0]["input_ids"]), precision, sizes)


def run(cfg: PretrainConfig, paths: Paths, train: TrainConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    job = setup(cfg, paths, train)
    acc = job.accelerator
    main = acc.is_main_process

    # resume: the main process clears checkpoints of other params or inputs, the others then match
    ckpts = Checkpoints(train, "pretrain", cfg, paths.base, paths.tokenized, main=main)
    acc.wait_for_everyone()
    last, start = ckpts.last()
    report = paths.report_dir("pretrain")
    if last is not None:
        log.info("resuming from %s (step %d of %d)", last, start, cfg.max_steps)
        acc.load_state(str(last))
        if main:
            restore_curves(last, report)
    acc.wait_for_everyone()
    curves = Curves(report) if main else None
    if curves is not None:  # the runner keeps a training stage's report folder: drop stale points
        curves.truncate(start if last is not None else -1)
    if last is None:
        val_before = evaluate(acc, job.model, job.val_loader, cfg.eval_batches)
        if curves is not None and val_before is not None:
            curves.log(0, {"val_loss": val_before})
    else:
        val_before = json.loads((last / STATE_FILE).read_text())["val_loss_before"]

    # train
    step_seconds, loss = train_steps(cfg, job, ckpts, curves, start, val_before)
    val_after = evaluate(acc, job.model, job.val_loader, cfg.eval_batches)
    if curves is not None and val_after is not None:
        curves.log(cfg.max_steps, {"val_loss": val_after})

    # save: a plain model in the base's dtype, with the tokenizer that encoded the blocks
    tokens_per_second = (cfg.max_steps - start) * job.tokens_per_step / step_seconds if step_seconds else None
    # Forward 2N FLOPs per token, backward 4N (2N with frozen weights: no weight gradients).
    flops_per_token = (6 if cfg.method == "full" else 4) * job.sizes["parameters"]
    peak = peak_flops(job.precision)
    metrics = {
        "method": cfg.method,
        **job.sizes,
        "precision": job.precision,
        "processes": acc.num_processes,
        "threads": threads(),
        "steps": cfg.max_steps,
        "resumed_from_step": start,
        "tokens": cfg.max_steps * job.tokens_per_step,
        "val_loss_before": rounded(val_before, 6),
        "val_loss_after": rounded(val_after, 6),
        "perplexity_before": perplexity(val_before),
        "perplexity_after": perplexity(val_after),
        "train_loss_final": rounded(loss, 6),
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "mfu": round(flops_per_token * tokens_per_second / (peak * acc.num_processes), 4)
               if peak and tokens_per_second else None,
    }
    plain = plain_model(acc, job.model, paths, cfg)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    if main:
        tokenizer = AutoTokenizer.from_pretrained(Path(paths.tokenized) / "tokenizer")
        save_model(paths.pretrain, "pretrain", cfg, metrics, plain.to(save_dtype(cfg, paths)), tokenizer)
        ckpts.finish()
    acc.wait_for_everyone()
    acc.free_memory()
    log.info("perplexity %s -> %s, %s tokens/s", metrics["perplexity_before"], metrics["perplexity_after"],
             metrics["tokens_per_second"])
    return metrics


def train_steps(cfg: PretrainConfig, job: Setup, ckpts: Checkpoints, curves: Curves | None, start: int,
                val_before: float | None) -> tuple[float, float]:
    """Optimizer steps `start`..max_steps with logging and checkpoints: (seconds, last loss)."""
    import torch

    acc, model, optimizer, scheduler = job.accelerator, job.model, job.optimizer, job.scheduler
    batches = micro_batches(acc, job.train_ds, cfg.batch_size, cfg.seed, cfg.shuffle,
                            start * cfg.gradient_accumulation_steps)
    step, step_seconds, loss_value = start, 0.0, float("nan")
    model.train()
    log.info("%s, %.1fM parameters (%.2fM trained), %d steps of %d tokens, %s on %s x%d", cfg.method,
             job.sizes["parameters"] / 1e6, job.sizes["trainable_parameters"] / 1e6, cfg.max_steps,
             job.tokens_per_step, job.precision, acc.device.type, acc.num_processes)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for _ in range(cfg.gradient_accumulation_steps):
            with acc.accumulate(model):
                ids = next(batches)["input_ids"]
                loss = model(input_ids=ids, labels=ids).loss
                acc.backward(loss)
                loss_sum += loss.detach().float()
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        loss_value = acc.reduce(loss_sum / cfg.gradient_accumulation_steps, "mean").item()
        dt = time.perf_counter() - t0
        step_seconds += dt
        eta = (cfg.max_steps - step) * step_seconds / (step - start)
        if acc.is_main_process:
            log.info("step %d/%d loss %.4f lr %.2e | %.0f tokens/s, %.2f s/step, ETA %s", step, cfg.max_steps,
                     loss_value, lr, job.tokens_per_step / dt, dt, time.strftime("%H:%M:%S", time.gmtime(eta)))
        if not math.isfinite(loss_value):
            raise StageError(f"the loss became {loss_value} at step {step}: lower pretrain.learning_rate")
        row: dict[str, float | None] = {}
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            row = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": job.tokens_per_step / dt,
                   "grad_norm": None if grad_norm is None else float(grad_norm)}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            row["val_loss"] = evaluate(acc, model, job.val_loader, cfg.eval_batches)
        if curves is not None and row:
            curves.log(step, {k: v for k, v in row.items() if v is not None})
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
            ckpts.save_accelerate(acc, step, curves, {"step": step, "val_loss_before": val_before})
    return step_seconds, loss_value


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", PretrainConfig, run, argv, training=TrainConfig)


if __name__ == "__main__":
    sys.exit(main())
