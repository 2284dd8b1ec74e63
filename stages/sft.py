"""sft: supervised fine-tuning of the pretrained model on instruction data (TRL `SFTTrainer`).

Reads `models/pretrain/` and `data/dedup/instructions/`, rendered as conversational
prompt-completion pairs with the chat template (loss on the answer only; full, LoRA or QLoRA,
merged). Writes `models/sft/` and `reports/sft/` (`metrics.json`: held-out loss before and after,
`truncated`, `dropped`; `curves.csv`; `samples.jsonl`; `held_out.jsonl`, the held-out examples as
rendered, on which evaluate measures the instruction loss).

    python -m stages.sft [--params params.yaml]
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common import training as tr
from stages.common.config import Paths, StageError
from stages.common.io import id_hash, is_val, read_records, write_jsonl
from stages.common.lm import greedy, load_chat_tokenizer
from stages.common.runner import run_stage
from stages.common.training import TrainConfig, TrainerStageConfig

log = logging.getLogger("llm_forge.sft")

STAGE = "sft"


class SftConfig(TrainerStageConfig):
    """The `sft` section: the shared Trainer knobs (stages/common/training.py) plus these."""

    method: Literal["full", "lora", "qlora"]
    """full: every weight trains; lora: low-rank adapters; qlora: adapters on a 4-bit NF4 base."""
    max_val: int | None = Field(ge=1)
    """Evaluate at most this many held-out records (CPU time); the others stay out of training too."""
    samples: int = Field(ge=0)
    """Held-out prompts whose greedy answers (before and after training) go to `samples.jsonl`."""
    sample_max_new_tokens: int = Field(ge=1)
    """Length of each sample generation, in tokens."""


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


def fit(tokenizer: Any, example: dict[str, Any], max_length: int) -> tuple[dict[str, Any] | None, str | None]:
    """`example` cut to `max_length` rendered tokens, or (None, reason) when it cannot be. The cut
    takes tokens from the end of the input (the prompt's last user message), never from the
    answer, and decodes the kept ones back to text, so the example stays a conversational pair.
    It fails when the answer (`answer_too_long`), or the rest of the prompt (`context_too_long`:
    a system message, earlier turns), leaves no room for a single token of input."""
    over = rendered_length(tokenizer, example) - max_length
    if over <= 0:
        return example, None
    prompt = example["prompt"]
    user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    ids = tokenizer(prompt[user]["content"], add_special_tokens=False)["input_ids"] if user is not None else []
    keep = len(ids) - over
    while keep > 0:
        # A cut inside a multi-byte character decodes to U+FFFD: drop that half character.
        content = tokenizer.decode(ids[:keep], clean_up_tokenization_spaces=False).rstrip("\ufffd")
        if not content.strip():
            break
        cut = {**example, "prompt": [*prompt[:user], {**prompt[user], "content": content}, *prompt[user + 1:]]}
        # Decoded text can tokenize differently at the cut: measure again, shorten by what is over.
        over = rendered_length(tokenizer, cut) - max_length
        if over <= 0:
            return cut, None
        keep -= over
    answer_alone = {"prompt": [{"role": "user", "content": ""}], "completion": example["completion"]}
    return None, "answer_too_long" if rendered_length(tokenizer, answer_alone) >= max_length else "context_too_long"


def prepare(records: list[dict[str, Any]], tokenizer: Any, cfg: SftConfig) -> tuple[list, list, Counter, int]:
    """(train, held-out, dropped, truncated): every record lands in exactly one of the first three;
    `truncated` counts the kept records whose input was cut to fit `max_length`."""
    train, val, dropped, truncated = [], [], Counter(), 0
    for record in records:
        example, reason = to_prompt_completion(record)
        if example is not None:
            fitted, reason = fit(tokenizer, example, cfg.max_length)
            truncated += fitted is not None and fitted != example
            example = fitted
        if example is None:
            dropped[reason] += 1
        elif is_val(example["id"], cfg.split_salt, cfg.val_fraction):
            val.append(example)
        else:
            train.append(example)
    # Held-out records in hash order, so that the first `max_val` (and the samples) mix sources.
    val.sort(key=lambda e: id_hash(e["id"], cfg.split_salt))
    return train, val, dropped, truncated


# --- model ------------------------------------------------------------------------------------


def build_trainer(cfg: SftConfig, model: Any, tokenizer: Any, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]], output_dir: Path, precision: str) -> Any:
    """TRL's SFTTrainer on conversational prompt-completion data (loss on the completion only)."""
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    def dataset(examples: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])

    args = tr.trainer_arguments(TrlSFTConfig, cfg, output_dir, precision, bool(eval_examples),
                             completion_only_loss=True)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(train_examples),
        eval_dataset=dataset(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=tr.peft_config(cfg.lora, "CAUSAL_LM") if cfg.method in ("lora", "qlora") else None,
    )


# --- stage ------------------------------------------------------------------------------------


def run(cfg: SftConfig, paths: Paths, train: TrainConfig) -> dict[str, Any]:
    source = Path(paths.dedup) / "instructions"
    if not Path(paths.pretrain).is_dir():
        raise StageError(f"{paths.pretrain} does not exist: run the pretrain stage first")
    main = os.environ.get("RANK", "0") == "0"

    # setup: the records as prompt-completion examples, the model, the trainer
    records = read_records(paths.dedup, "instructions")
    tokenizer = load_chat_tokenizer(paths.pretrain, "SFT renders conversations with it")
    train_examples, val_examples, dropped, truncated = prepare(records, tokenizer, cfg)
    if not train_examples:
        raise StageError(f"{source} has no usable instruction record for training ({len(records)} read, "
                         f"{len(val_examples)} held out, dropped {dict(dropped)})")
    log.info("%d train, %d held-out records (%d truncated to max_length %d); dropped %s", len(train_examples),
             len(val_examples), truncated, cfg.max_length, dict(dropped))
    eval_examples = val_examples[: cfg.max_val] if cfg.max_val else val_examples
    sample_prompts = [e["prompt"] for e in (val_examples or train_examples)[: cfg.samples]]
    tr.seed_everything(cfg.seed)
    precision = tr.resolve_precision(train.precision)
    model = tr.load_trainable_lm(paths.pretrain, cfg.method, precision, "sft")
    before = greedy(model, tokenizer, sample_prompts, cfg.sample_max_new_tokens) if main else []
    checkpoints = tr.Checkpoints(train, STAGE, cfg, paths.pretrain, source, main=main)
    resume_path, resume_step = checkpoints.last()
    trainer = build_trainer(cfg, model, tokenizer, train_examples, eval_examples, checkpoints.dir, precision)
    sizes = tr.count_parameters(trainer.model)

    # train: held-out loss before and after; a resumed run continues its curve
    val_before = trainer.evaluate()["eval_loss"] if eval_examples else None
    curves = tr.Curves(paths.report_dir(STAGE))
    train_loss = tr.train_with_curves(trainer, curves, resume_path, resume_step, main, {"eval_loss": val_before})
    val_after = trainer.evaluate()["eval_loss"] if eval_examples else None

    # save: a plain full-precision model, its samples and metrics
    merged = tr.merged_lm(trainer, cfg.method, paths.pretrain, checkpoints.dir / "final")
    metrics: dict[str, Any] = {
        **tr.split_counts(len(records), train_examples, val_examples, dropped),
        "truncated": truncated,
        "eval_records": len(eval_examples),
        "method": cfg.method,
        "precision": precision,
        **sizes,
        "steps": trainer.state.global_step,
        "train_loss": tr.rounded(train_loss),
        "val_loss_before": tr.rounded(val_before),
        "val_loss_after": tr.rounded(val_after),
        "resumed_from_step": resume_step,
    }
    if main:
        after = greedy(merged, tokenizer, sample_prompts, cfg.sample_max_new_tokens)
        examples = (val_examples or train_examples)[: cfg.samples]
        write_jsonl(paths.sft_held_out(), val_examples)
        write_jsonl(paths.report_dir(STAGE) / "samples.jsonl",
                    [{"id": e["id"], "prompt": e["prompt"][-1]["content"], "reference": e["completion"][0]["content"],
                      "before": b, "after": a} for e, b, a in zip(examples, before, after)])
        tr.save_model(paths.sft, STAGE, cfg, metrics, merged, tokenizer)
        checkpoints.finish()
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, SftConfig, run, argv, training=TrainConfig)


if __name__ == "__main__":
    sys.exit(main())
