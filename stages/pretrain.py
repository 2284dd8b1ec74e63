"""pretrain: continued pretraining of the base model on the packed corpus blocks.

Reads `models/base/` (a plain Hugging Face causal LM folder) and `data/tokenized/` (a
`datasets.DatasetDict` with fixed-length `input_ids` blocks in `train` and `val`, plus the
`tokenizer/` that encoded them). Trains with next-token loss in a plain PyTorch loop driven by
`accelerate.Accelerator` (full fine-tuning, or LoRA merged back into a plain model before saving),
AdamW, warmup + cosine/linear schedule, gradient accumulation and clipping; so the same loop runs
on one CPU and under `accelerate launch` with FSDP or DeepSpeed (`train.num_processes > 1`).
Checkpoints every `save_steps` go to `<train.checkpoints>/pretrain/`; a rerun with the same
params and inputs resumes from the last complete one. Writes `models/pretrain/` (model, tokenizer,
`llm_forge.yaml`, `metrics.json`) and `reports/pretrain/` (`metrics.json`, `curves.csv`): held-out
perplexity before and after, final train loss, tokens/s, MFU (GPU only), `resumed_from_step`.

    python -m stages.pretrain [--params params.yaml] [--no-mlflow]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.runner import run_stage
from stages.common.training import (
    Checkpoints,
    Curves,
    TrainConfig,
    dir_signature,
    fingerprint,
    resolve_precision,
    save_model,
    seed_everything,
)

log = logging.getLogger("llm_forge.pretrain")

STATE_FILE = "pretrain_state.json"  # beside accelerate's files in each checkpoint

# Dense bf16 peak TFLOP/s per GPU, for the MFU estimate (first match of the device name wins).
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0}


class LoraSettings(StageConfig):
    """Low-rank adapters (peft) instead of full fine-tuning; merged into the model before saving."""

    r: int = Field(16, ge=1)
    """Rank of each adapter."""
    alpha: int = Field(32, ge=1)
    """Scale numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers (by module name) that get adapters."""


class PretrainConfig(StageConfig):
    """The `pretrain` section: what continued pretraining does (how it runs: the `train` section)."""

    max_steps: int = Field(6, ge=1)
    """Optimizer steps to train for (the data repeats, reshuffled, when it runs out)."""
    batch_size: int = Field(4, ge=1)
    """Blocks per micro-batch on each process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (tokens per step: batch_size x grad_accum x processes x block)."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Decay after warmup (`transformers.get_scheduler` name)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to learning_rate (its first step trains at lr 0)."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, applied to matrices only (not to norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping; the norm is still logged)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    compile: bool = False
    """`torch.compile` the model (worth it on GPU; the first step compiles for a while)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight (null: full fine-tuning)."""
    shuffle: bool = True
    """Shuffle the train blocks (a fresh seeded order each pass over the data)."""
    seed: int = 0
    """Seed of the adapters' init, dropout and the data order."""
    log_steps: int = Field(1, ge=1)
    """Write train loss, lr, tokens/s and grad norm to the curves every this many steps."""
    eval_steps: int = Field(0, ge=0)
    """Val loss into the curves every this many steps (0: only before and after training)."""
    eval_batches: int = Field(4, ge=0)
    """Val micro-batches per evaluation (0: no perplexity)."""
    save_steps: int = Field(3, ge=0)
    """Resumable checkpoint every this many steps (0: none)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the saved weights; auto: the dtype the base model was saved in."""


# ---------------------------------------------------------------------------------------------
# inputs


def load_blocks(paths: Paths, model_config: Any) -> Any:
    """The tokenized DatasetDict, checked against the model: StageError before any training."""
    import datasets
    import pyarrow.compute as pc

    folder = Path(paths.tokenized)
    try:
        dsd = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"pretrain: {folder} is not a tokenized DatasetDict (run the tokenize stage): {err}") from None
    missing = [s for s in ("train", "val") if s not in dsd]
    if missing or "input_ids" not in dsd["train"].column_names:
        raise StageError(f"pretrain: {folder} lacks {missing or 'the input_ids column'}")
    vocab = model_config.vocab_size
    max_pos = getattr(model_config, "max_position_embeddings", None)
    for split in ("train", "val"):
        ds = dsd[split]
        if len(ds) == 0:
            continue
        column = ds.data.column("input_ids")
        block = len(ds[0]["input_ids"])
        top = pc.max(pc.list_flatten(column)).as_py()
        if top is not None and top >= vocab:
            raise StageError(f"pretrain: {folder} ({split}) holds token id {top} but the model in {paths.base} "
                             f"has a vocabulary of {vocab}: the data was tokenized for another model "
                             "(rerun tokenize)")
        if max_pos is not None and block > max_pos:
            raise StageError(f"pretrain: {folder} holds blocks of {block} tokens but the model in {paths.base} "
                             f"takes at most {max_pos} positions: lower tokenize.block_size")
    return dsd.with_format("numpy")


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))}


def loader(ds: Any, batch_size: int, order: np.ndarray | None, drop_last: bool) -> Any:
    import torch
    from torch.utils.data import DataLoader

    # A plain list of indices as the sampler: the order is ours (seeded per epoch), so a resumed
    # run sees exactly the batches an uninterrupted one would, and accelerate can still shard it.
    # Its own generator: a DataLoader iterator draws a seed, which must not come from (and shift)
    # the global RNG that dropout uses and a checkpoint restores.
    sampler = order.tolist() if order is not None else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(0))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def micro_batches(accelerator: Any, ds: Any, cfg: PretrainConfig, start: int) -> Iterator[dict[str, Any]]:
    """Train micro-batches forever (epoch after epoch), starting after the first `start`."""
    def epoch_loader(epoch: int) -> Any:
        return accelerator.prepare_data_loader(
            loader(ds, cfg.batch_size, epoch_order(len(ds), cfg.seed, epoch, cfg.shuffle), drop_last=True))

    first = epoch_loader(0)
    per_epoch = len(first)
    epoch, skip = divmod(start, per_epoch)
    dl = first if epoch == 0 else epoch_loader(epoch)
    while True:
        yield from accelerator.skip_first_batches(dl, skip) if skip else dl
        epoch, skip = epoch + 1, 0
        dl = epoch_loader(epoch)


# ---------------------------------------------------------------------------------------------
# model


def load_model(paths: Paths, cfg: PretrainConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                 lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.target_modules),
                                                 task_type="CAUSAL_LM"))
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
    if cfg.lora is not None:
        plain = plain.merge_and_unload()
    plain.config.use_cache = True
    return plain.to("cpu")


def save_dtype(cfg: PretrainConfig, paths: Paths) -> Any:
    import torch

    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    stored = json.loads((Path(paths.base) / "config.json").read_text()).get("dtype") or "float32"
    return getattr(torch, stored) if isinstance(getattr(torch, stored, None), torch.dtype) else torch.float32


def peak_flops(precision: str) -> float | None:
    """Peak FLOP/s of one accelerator for MFU; None on CPU or an unknown GPU."""
    import torch

    if not torch.cuda.is_available() or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS_BF16.items() if key in name), None)


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(accelerator: Any, model: Any, val_loader: Any, max_batches: int) -> float | None:
    """Mean next-token loss over the first `max_batches` val micro-batches (all processes)."""
    import torch

    if max_batches == 0 or val_loader is None:
        return None
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    rows = 0
    with torch.no_grad():
        for i, batch in enumerate(val_loader):
            if i >= max_batches:
                break
            ids = batch["input_ids"]  # every block has the same length: weigh batches by rows
            loss_sum += model(input_ids=ids, labels=ids).loss.double() * ids.shape[0]
            rows += ids.shape[0]
    model.train()
    total = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(rows)]), "sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else round(math.exp(min(loss, 50.0)), 4)


# ---------------------------------------------------------------------------------------------
# the stage


def run(cfg: PretrainConfig, paths: Paths, train: TrainConfig = TrainConfig()) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin
    from transformers import AutoConfig, AutoTokenizer, get_scheduler

    started = time.perf_counter()
    for folder, stage in ((paths.base, "base"), (paths.tokenized, "tokenize")):
        if not Path(folder).exists():
            raise StageError(f"pretrain: {folder} does not exist (run the {stage} stage first)")
    try:
        model_config = AutoConfig.from_pretrained(paths.base)
    except (OSError, ValueError) as err:
        raise StageError(f"pretrain: {paths.base} is not a model folder: {err}") from None
    dsd = load_blocks(paths, model_config)
    train_ds, val_ds = dsd["train"], dsd["val"]
    block = len(train_ds[0]["input_ids"])

    precision = resolve_precision(train.precision)
    accelerator = Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        dynamo_backend="inductor" if cfg.compile else "no")
    main = accelerator.is_main_process
    if len(train_ds) < cfg.batch_size * accelerator.num_processes:
        raise StageError(f"pretrain: {paths.tokenized} has {len(train_ds)} train blocks, fewer than one batch "
                         f"({cfg.batch_size} x {accelerator.num_processes} processes): lower pretrain.batch_size")

    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants it before prepare()
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    seed_everything(cfg.seed)
    model = load_model(paths, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, cfg, accelerator.device.type)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is ours to step once per optimizer step (accelerate would step it once per
    # process); registered so that save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)
    val_loader = accelerator.prepare_data_loader(loader(val_ds, cfg.batch_size, None, drop_last=False)) if len(val_ds) else None

    print_ = fingerprint(cfg.model_dump(mode="json"),
                         train.model_dump(mode="json", include={"num_processes", "distributed", "precision"}),
                         dir_signature(paths.base), dir_signature(paths.tokenized))
    # The main process clears checkpoints of other params or inputs; the others then find a match.
    ckpts = Checkpoints(train, "pretrain", print_) if main else None
    accelerator.wait_for_everyone()
    ckpts = ckpts or Checkpoints(train, "pretrain", print_)
    last, start = ckpts.last()
    report = paths.report_dir("pretrain")
    state: dict[str, Any] = {}
    if last is not None:
        log.info("resuming from %s (step %d of %d)", last, start, cfg.max_steps)
        accelerator.load_state(str(last))
        state = json.loads((last / STATE_FILE).read_text())
        if main and (last / "curves.csv").exists():
            report.mkdir(parents=True, exist_ok=True)
            shutil.copy2(last / "curves.csv", report / "curves.csv")
    accelerator.wait_for_everyone()
    curves = Curves(report) if main else None
    if curves is not None:  # the runner keeps a training stage's report folder: drop stale points
        curves.truncate(start if last is not None else -1)

    if last is None:
        val_before = evaluate(accelerator, model, val_loader, cfg.eval_batches)
        if curves is not None and val_before is not None:
            curves.log(0, {"val_loss": val_before})
    else:
        val_before = state["val_loss_before"]

    tokens_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes * block
    # Forward 2N FLOPs per token, backward 4N (2N with frozen weights: no weight gradients).
    flops_per_token = (6 if cfg.lora is None else 4) * n_params
    peak = peak_flops(precision)
    batches = micro_batches(accelerator, train_ds, cfg, start * cfg.grad_accum)
    step, step_seconds, loss_value = start, 0.0, float("nan")
    model.train()
    log.info("pretrain: %s, %.1fM parameters (%.2fM trained), %d steps of %d tokens, %s on %s x%d",
             "LoRA" if cfg.lora else "full fine-tuning", n_params / 1e6, n_trainable / 1e6, cfg.max_steps,
             tokens_per_step, precision, accelerator.device.type, accelerator.num_processes)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                ids = batch["input_ids"]
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                loss_sum += loss.detach().float()
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        loss_value = accelerator.reduce(loss_sum / cfg.grad_accum, "mean").item()
        dt = time.perf_counter() - t0
        step_seconds += dt
        done = step - start
        rate = tokens_per_step / dt
        eta = (cfg.max_steps - step) * step_seconds / done
        if main:
            log.info("step %d/%d loss %.4f lr %.2e | %.0f tokens/s, %.2f s/step, ETA %s",
                     step, cfg.max_steps, loss_value, lr, rate, dt, time.strftime("%H:%M:%S", time.gmtime(eta)))
        if not math.isfinite(loss_value):
            raise StageError(f"pretrain: the loss became {loss_value} at step {step}: lower pretrain.learning_rate")
        row: dict[str, float] = {}
        if step % cfg.log_steps == 0 or step == cfg.max_steps:
            row = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": rate}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            row["val_loss"] = evaluate(accelerator, model, val_loader, cfg.eval_batches)
        if curves is not None and row:
            curves.log(step, {k: v for k, v in row.items() if v is not None})
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
            save_checkpoint(accelerator, ckpts, step, report, {"step": step, "val_loss_before": val_before})

    val_after = evaluate(accelerator, model, val_loader, cfg.eval_batches)
    if curves is not None and val_after is not None:
        curves.log(step, {"val_loss": val_after})
    trained_tokens = (step - start) * tokens_per_step
    tokens_per_second = trained_tokens / step_seconds if step_seconds else None
    metrics = {
        "method": "lora" if cfg.lora else "full",
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "precision": precision,
        "processes": accelerator.num_processes,
        "steps": step,
        "resumed_from_step": start,
        "tokens": step * tokens_per_step,
        "val_loss_before": _round(val_before),
        "val_loss_after": _round(val_after),
        "perplexity_before": perplexity(val_before),
        "perplexity_after": perplexity(val_after),
        "train_loss_final": _round(loss_value),
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "mfu": round(flops_per_token * tokens_per_second / (peak * accelerator.num_processes), 4)
               if peak and tokens_per_second else None,
    }
    plain = plain_model(accelerator, model, paths, cfg)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    if main:
        tokenizer = AutoTokenizer.from_pretrained(Path(paths.tokenized) / "tokenizer")
        save_model(paths.pretrain, "pretrain", cfg, metrics, plain.to(save_dtype(cfg, paths)), tokenizer)
        ckpts.finish()
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    log.info("pretrain: perplexity %s -> %s, %s tokens/s", metrics["perplexity_before"],
             metrics["perplexity_after"], metrics["tokens_per_second"])
    return metrics


def save_checkpoint(accelerator: Any, ckpts: Checkpoints, step: int, report: Path, state: dict[str, Any]) -> None:
    """Model, optimizer, scheduler and RNG states (accelerate), the curves so far and our own
    counters; COMPLETE last, so a checkpoint killed half-way is never resumed from."""
    path = ckpts.path(step)
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a half-written one from a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(state) + "\n")
        if (report / "curves.csv").exists():
            shutil.copy2(report / "curves.csv", path / "curves.csv")
        ckpts.mark_complete(path)
        for old in ckpts.dir.glob("checkpoint-*"):  # only the newest is ever resumed from
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", path)
    accelerator.wait_for_everyone()


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", PretrainConfig, run, argv, training=True)


if __name__ == "__main__":
    sys.exit(main())
