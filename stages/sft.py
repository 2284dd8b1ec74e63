"""sft: supervised fine-tuning of the pretrained model on instruction data (TRL `SFTTrainer`).

Reads the model and tokenizer of `models/pretrain/` and `data/dedup/instructions.parquet`
(records `{id, source, messages}`). Each record becomes a conversational prompt-completion pair:
the prompt is every message before the last assistant turn, the completion that turn, both
rendered with the tokenizer's chat template, so the loss is on the answer only. Records go to
train or held-out by a salted hash of their id; the held-out loss is measured before and after
training. `method` picks full fine-tuning, LoRA, or QLoRA (base loaded 4-bit NF4); adapters are
merged into a plain full-precision model at the end, so later stages load a normal model.
Writes `models/sft/` (model, tokenizer, `llm_forge.yaml`, `metrics.json`), and in
`reports/sft/` the training curves (`curves.csv`) and greedy generations for a few held-out
prompts before and after (`samples.jsonl`). A record without an answer, or whose rendering is
longer than `max_length` tokens, is skipped (not truncated) and counted under `dropped`.
Checkpoints go to `<train.checkpoints>/sft/`; a killed run resumes from the last one.

    python -m stages.sft [--params params.yaml]
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import id_hash, is_val, read_records, write_jsonl
from stages.common.runner import run_stage
from stages.common.training import (
    Checkpoints,
    Curves,
    TrainConfig,
    device,
    dir_signature,
    fingerprint,
    resolve_precision,
    save_model,
    seed_everything,
    train_model,
    trainer_callback,
)

log = logging.getLogger("llm_forge.sft")

STAGE = "sft"


class SftConfig(StageConfig):
    method: Literal["full", "lora", "qlora"] = "lora"
    """full: every weight trains; lora: low-rank adapters; qlora: adapters on a 4-bit NF4 base."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate (LoRA wants about 1e-4..3e-4, full fine-tuning about 1e-5..5e-5)."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(4, ge=1)
    """Records per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Steps whose gradients add up before each optimizer update."""
    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the training records (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (null: `num_train_epochs` decides)."""
    max_length: int = Field(512, ge=8)
    """Longest rendered prompt + answer in tokens; longer records are skipped and counted."""
    group_by_length: bool = True
    """Batch records of similar length together (much less padding; order still seeded)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more time."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank (lora and qlora)."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names (q_proj, v_proj, ...)."""
    val_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of records held out (by id hash) to measure the loss before and after training."""
    max_val: int | None = Field(64, ge=1)
    """Evaluate at most this many held-out records (CPU time); the others stay out of training too."""
    split_salt: str = "llm-forge"
    """Salt of the id hash that assigns records to train or held-out; change it to reshuffle."""
    eval_steps: int | None = Field(None, ge=1)
    """Also measure the held-out loss every this many steps (null: only before and after)."""
    logging_steps: int = Field(5, ge=1)
    """Steps between two points of the training curve."""
    save_steps: int = Field(50, ge=1)
    """Steps between two resumable checkpoints."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept while training (older ones are deleted)."""
    samples: int = Field(3, ge=0)
    """Held-out prompts whose greedy answers (before and after training) go to `samples.jsonl`."""
    sample_max_new_tokens: int = Field(48, ge=1)
    """Length of each sample generation, in tokens."""
    seed: int = 0
    """Seed of weight init (adapters), data order and dropout."""


# --- data -------------------------------------------------------------------------------------


def to_prompt_completion(record: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A conversational prompt-completion example, or (None, reason) for a record that has none:
    the prompt is every message before the last assistant turn, the completion that turn."""
    messages = [{"role": m["role"], "content": m["content"] or ""} for m in record.get("messages") or []]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, "no_answer"
    if not messages[last]["content"].strip():
        return None, "empty_answer"
    if last == 0:
        return None, "no_prompt"
    return {"id": record["id"], "prompt": messages[:last], "completion": [messages[last]]}, None


def rendered_length(tokenizer: Any, example: dict[str, Any]) -> int:
    """Tokens of prompt + completion as the trainer renders them (chat template)."""
    ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True, return_dict=True)
    return len(ids["input_ids"])


def prepare(records: list[dict[str, Any]], tokenizer: Any, cfg: SftConfig) -> tuple[list, list, Counter]:
    """(train, held-out, dropped) examples; every record lands in exactly one of the three."""
    train, val, dropped = [], [], Counter()
    for record in records:
        example, reason = to_prompt_completion(record)
        if example is None:
            dropped[reason] += 1
        elif rendered_length(tokenizer, example) > cfg.max_length:
            dropped["too_long"] += 1
        elif is_val(example["id"], cfg.split_salt, cfg.val_fraction):
            val.append(example)
        else:
            train.append(example)
    # Held-out records in hash order, so that the first `max_val` (and the samples) mix sources.
    val.sort(key=lambda e: id_hash(e["id"], cfg.split_salt))
    return train, val, dropped


# --- model ------------------------------------------------------------------------------------


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise StageError(f"{folder} holds no tokenizer that loads ({err})") from None
    if not tokenizer.chat_template:
        raise StageError(f"the tokenizer in {folder} has no chat template: SFT renders conversations with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(folder: Path, method: str, precision: str) -> Any:
    """The causal LM to train: full precision, or 4-bit NF4 for qlora (which needs bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device())
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=compute,
                                                     device_map={"": device()})
    except (ImportError, RuntimeError, ValueError) as err:
        raise StageError(f"sft.method qlora: cannot load {folder} in 4-bit NF4 on this machine ({err}); "
                         "use method lora or full, or a machine where bitsandbytes runs") from err
    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 inference kernel the first time a CPU
    # forward runs without grad (our held-out eval); that kernel has no backward and needs dims
    # divisible by 32, so training after an eval would break: keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def lora_config(cfg: SftConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def merged_model(trainer: Any, cfg: SftConfig, base: Path, scratch: Path) -> Any:
    """The trained model as a plain full-precision causal LM: adapters merged into a base loaded
    in full precision (for qlora the 4-bit base is not what we ship)."""
    import torch
    from transformers import AutoModelForCausalLM

    trainer.save_model(str(scratch))  # gathers sharded weights; adapters only for lora/qlora
    if cfg.method == "full":
        return AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).to(device())
    from peft import PeftModel

    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device())
    return PeftModel.from_pretrained(full, scratch, torch_dtype=torch.float32).merge_and_unload()


def generate(model: Any, tokenizer: Any, examples: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each example's prompt."""
    import torch

    answers = []
    model.eval()
    for example in examples:
        enc = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def build_trainer(cfg: SftConfig, model: Any, tokenizer: Any, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]], output_dir: Path, precision: str) -> Any:
    """TRL's SFTTrainer on conversational prompt-completion data (loss on the completion only)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    def dataset(examples: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])

    args = TrlSFTConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of the steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1,
        max_length=cfg.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps and eval_examples else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(train_examples),
        eval_dataset=dataset(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if cfg.method in ("lora", "qlora") else None,
    )


def count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- stage ------------------------------------------------------------------------------------


def run(cfg: SftConfig, paths: Paths, train: TrainConfig = TrainConfig()) -> dict[str, Any]:
    import os

    source = Path(paths.dedup) / "instructions.parquet"
    records = read_records(paths.dedup, "instructions")
    if not Path(paths.pretrain).is_dir():
        raise StageError(f"{paths.pretrain} does not exist: run the pretrain stage first")
    tokenizer = load_tokenizer(paths.pretrain)
    train_examples, val_examples, dropped = prepare(records, tokenizer, cfg)
    if not train_examples:
        raise StageError(f"{source} has no usable instruction record for training ({len(records)} read, "
                         f"{len(val_examples)} held out, dropped {dict(dropped)})")
    log.info("sft: %d train, %d held-out records; dropped %s", len(train_examples), len(val_examples), dict(dropped))
    eval_examples = val_examples[: cfg.max_val] if cfg.max_val else val_examples
    sample_examples = (val_examples or train_examples)[: cfg.samples]

    seed_everything(cfg.seed)
    precision = resolve_precision(train.precision)
    main_process = os.environ.get("RANK", "0") == "0"
    model = load_model(paths.pretrain, cfg.method, precision)
    before = generate(model, tokenizer, sample_examples, cfg.sample_max_new_tokens) if main_process else []

    checkpoints = Checkpoints(train, STAGE, fingerprint(cfg.model_dump(mode="json"), dir_signature(paths.pretrain),
                                                        dir_signature(source)))
    resume_path, resume_step = checkpoints.last()
    curves = Curves(paths.report_dir(STAGE))
    trainer = build_trainer(cfg, model, tokenizer, train_examples, eval_examples, checkpoints.dir, precision)
    trainable, total = count_params(trainer.model)

    eval_before = trainer.evaluate()["eval_loss"] if eval_examples else None
    if resume_path is not None:
        log.info("sft: resuming from %s (step %d)", resume_path, resume_step)
    if main_process:  # a resumed run continues its curve; a fresh one starts a new curve
        curves.truncate(resume_step if resume_path is not None else -1)
        if resume_path is None and eval_before is not None:
            curves.log(0, {"eval_loss": eval_before})
    trainer.add_callback(trainer_callback(curves))
    train_loss = train_model(trainer, resume_path)
    eval_after = trainer.evaluate()["eval_loss"] if eval_examples else None

    merged = merged_model(trainer, cfg, paths.pretrain, checkpoints.dir / "final")
    metrics: dict[str, Any] = {
        "docs_in": len(records),
        "docs_out": len(train_examples) + len(val_examples),
        "dropped": dict(sorted(dropped.items())),
        "train_records": len(train_examples),
        "val_records": len(val_examples),
        "eval_records": len(eval_examples),
        "method": cfg.method,
        "precision": precision,
        "trainable_params": trainable,
        "total_params": total,
        "steps": trainer.state.global_step,
        "train_loss": None if train_loss is None else round(train_loss, 4),
        "eval_loss_before": None if eval_before is None else round(eval_before, 4),
        "eval_loss_after": None if eval_after is None else round(eval_after, 4),
        "resumed_from_step": resume_step,
    }
    if main_process:
        after = generate(merged, tokenizer, sample_examples, cfg.sample_max_new_tokens)
        write_jsonl(paths.report_dir(STAGE) / "samples.jsonl",
                    [{"id": e["id"], "prompt": e["prompt"][-1]["content"], "reference": e["completion"][0]["content"],
                      "before": b, "after": a} for e, b, a in zip(sample_examples, before, after)])
        save_model(paths.sft, STAGE, cfg, metrics, merged, tokenizer)
        checkpoints.finish()
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, SftConfig, run, argv, training=True)


if __name__ == "__main__":
    sys.exit(main())
