"""reward: the proxy reward model and the judge, two sequence classifiers trained with one recipe
(TRL `RewardTrainer`) on the `reward` and `judge` parts of the preference data.

Reads `data/dedup/preferences/` and the backbone `reward.backbone` names (`models/sft/` or a model
folder). Writes `models/reward/` (the proxy `ppo` optimizes), `models/judge/` (only `evaluate` and
the champion gate score with it) and `reports/reward/` (`metrics.json`: each one's held-out pairwise
accuracy before and after; `curves.csv`, `curves_judge.csv`).

    python -m stages.reward [--params params.yaml]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common import training as tr
from stages.common.config import Paths, StageError, resolve_path
from stages.common.io import is_val, read_records
from stages.common.preferences import JUDGE, PARTS, REWARD, SPLIT, normalize_prompt, pair_messages, pair_texts
from stages.common.runner import run_stage
from stages.common.training import TrainConfig, TrainerStageConfig

log = logging.getLogger("llm_forge.reward")

STAGE = "reward"
# model -> (the part of the preference data it trains on, its `paths` key)
MODELS = {"proxy": (REWARD, "reward"), "judge": (JUDGE, "judge")}


class RewardConfig(TrainerStageConfig):
    """The `reward` section: the shared Trainer knobs (stages/common/training.py) plus these."""

    backbone: str
    """`sft` (the model of `paths.sft`), or a model folder (`pkg://package/dir` inside a package)."""
    method: Literal["full", "lora"]
    """full: every weight trains; lora: adapters plus the score head (merged at the end)."""
    center_rewards_coefficient: float | None = Field(ge=0)
    """Weight of a penalty on the squared mean reward, keeping rewards near zero (null: off)."""


# --- data -------------------------------------------------------------------------------------


def encode(tokenizer: Any, prompt: str | list[dict[str, str]], answer: str) -> list[int]:
    """Token ids of prompt (a user turn, or the conversation up to it) + answer as the reward model
    reads them, in TRL's two formats: the chat template when the tokenizer has one (a causal LM
    scores its last token), else the plain text of the turns + answer + EOS with the tokenizer's own
    special tokens (an encoder scores its [CLS]). `evaluate` and `ppo` score texts the same way
    (`stages.common.rl.reward_text`)."""
    messages = pair_messages(prompt, answer, answer)
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages["prompt"] + messages["chosen"], tokenize=True,
                                                  return_dict=True)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages["prompt"])
    return list(tokenizer(text + answer + (tokenizer.eos_token or ""))["input_ids"])


def input_format(tokenizer: Any) -> str:
    return "chat_template" if tokenizer.chat_template else "text"


def prepare(records: list[dict[str, Any]], tokenizer: Any, cfg: RewardConfig) -> tuple[list, list, Counter]:
    """(train, held-out, dropped) tokenized pairs; every record lands in exactly one of the three.
    Held-out by a salted hash of the normalized prompt: every pair of a prompt on one side."""
    train, val, dropped = [], [], Counter()
    for r in records:
        (prompt, chosen, rejected), problem = pair_texts(r)
        if problem:
            dropped[problem] += 1
            continue
        chosen_ids, rejected_ids = encode(tokenizer, prompt, chosen), encode(tokenizer, prompt, rejected)
        if max(len(chosen_ids), len(rejected_ids)) > cfg.max_length:
            dropped["too_long"] += 1
            continue
        pair = {"id": r["id"], "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        (val if is_val(normalize_prompt(prompt), cfg.split_salt, cfg.val_fraction) else train).append(pair)
    return train, val, dropped


# --- model ------------------------------------------------------------------------------------


def backbone_path(cfg: RewardConfig, paths: Paths) -> Path:
    if cfg.backbone == "sft":
        return Path(paths.sft)
    try:
        return resolve_path(cfg.backbone)
    except FileNotFoundError as err:
        raise StageError(f"reward.backbone: {err}") from None


def load_backbone(folder: Path) -> tuple[Any, Any]:
    """(sequence classifier with one output, tokenizer with a pad token) from a model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not folder.is_dir():
        raise StageError(f"reward.backbone: {folder} is not a model folder (run the sft stage first for `sft`)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise StageError(f"reward.backbone: {folder} holds no tokenizer that loads ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    model = model.to(tr.device())
    # A sequence classifier finds each sequence's last real token through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def rewards(model: Any, tokenizer: Any, sequences: list[list[int]], batch_size: int) -> list[float]:
    """The model's scalar reward for each token sequence (right-padded batches)."""
    import torch

    out: list[float] = []
    model.eval()
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=model.device)
        with torch.no_grad():
            out.extend(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())
    return out


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int) -> float | None:
    """Share of pairs whose chosen answer the model scores above the rejected one."""
    if not pairs:
        return None
    chosen = rewards(model, tokenizer, [p["chosen_ids"] for p in pairs], batch_size)
    rejected = rewards(model, tokenizer, [p["rejected_ids"] for p in pairs], batch_size)
    return round(sum(c > r for c, r in zip(chosen, rejected)) / len(pairs), 4)


def build_trainer(cfg: RewardConfig, model: Any, tokenizer: Any, train_pairs: list[dict[str, Any]],
                  eval_pairs: list[dict[str, Any]], output_dir: Path, precision: str) -> Any:
    """TRL's RewardTrainer on pre-tokenized chosen/rejected pairs."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    def dataset(pairs: list[dict[str, Any]]) -> Any:
        # `length` is what the length-grouped sampler sorts by; the collator ignores it
        return Dataset.from_list([{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"],
                                   "length": max(len(p["chosen_ids"]), len(p["rejected_ids"]))} for p in pairs])

    args = tr.trainer_arguments(TrlRewardConfig, cfg, output_dir, precision, bool(eval_pairs),
                             center_rewards_coefficient=cfg.center_rewards_coefficient,
                             length_column_name="length",
                             remove_unused_columns=False)  # keeps `length` for the sampler
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset(train_pairs),
        eval_dataset=dataset(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=tr.peft_config(cfg.lora, "SEQ_CLS") if cfg.method == "lora" else None,
    )


def trained_model(trainer: Any, cfg: RewardConfig, backbone: Path, scratch: Path) -> Any:
    """The trained reward model as a plain sequence classifier (LoRA adapters merged)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    trainer.save_model(str(scratch))  # gathers sharded weights; adapters (+ score head) only for lora
    if cfg.method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(scratch, num_labels=1, dtype=torch.float32)
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, scratch).merge_and_unload()
    model.config.pad_token_id = trainer.processing_class.pad_token_id
    return model.to(tr.device())


# --- stage ------------------------------------------------------------------------------------


def train_one(name: str, records: list[dict[str, Any]], cfg: RewardConfig, paths: Paths, train: TrainConfig,
              backbone: Path, main: bool) -> tuple[dict[str, Any], tr.Checkpoints]:
    """Train model `name` (`MODELS`) on its part of `records` and save it; its metrics, and its
    checkpoints (kept until both models are saved, so that a run killed while training the second
    resumes the first from its last checkpoint)."""
    part, out = MODELS[name][0], Path(getattr(paths, MODELS[name][1]))
    source = Path(paths.dedup) / "preferences"

    # setup: the backbone with a fresh score head (the same seed for both models), the pairs tokenized as it reads them
    tr.seed_everything(cfg.seed)
    model, tokenizer = load_backbone(backbone)
    train_pairs, val_pairs, dropped = prepare(records, tokenizer, cfg)
    if not train_pairs:
        raise StageError(f"{source} has no usable preference pair for the {name} (split {part}: {len(records)} "
                         f"read, {len(val_pairs)} held out, dropped {dict(dropped)})")
    log.info("%s: %d train, %d held-out pairs; dropped %s", name, len(train_pairs), len(val_pairs), dict(dropped))
    precision = tr.resolve_precision(train.precision)
    checkpoints = tr.Checkpoints(train, f"{STAGE}/{name}", cfg, backbone, source, main=main)
    resume_path, resume_step = checkpoints.last()
    trainer = build_trainer(cfg, model, tokenizer, train_pairs, val_pairs, checkpoints.dir, precision)
    sizes = tr.count_parameters(trainer.model)

    # train: held-out pairwise accuracy before and after; a resumed run continues its curve
    accuracy_before = pairwise_accuracy(model, tokenizer, val_pairs, cfg.batch_size)
    curves = tr.Curves(paths.report_dir(STAGE), CURVES[name], prefix=f"{name}/")
    train_loss = tr.train_with_curves(trainer, curves, resume_path, resume_step, main,
                                      {"eval_pairwise_accuracy": accuracy_before})
    final = trained_model(trainer, cfg, backbone, checkpoints.dir / "final")
    accuracy_after = pairwise_accuracy(final, tokenizer, val_pairs, cfg.batch_size)

    # save: a plain sequence classifier and its metrics
    metrics: dict[str, Any] = {
        "split": part,
        **tr.split_counts(len(records), train_pairs, val_pairs, dropped),
        "input_format": input_format(tokenizer),
        "precision": precision,
        **sizes,
        **tr.loss_figures(trainer, train_loss),
        "pairwise_accuracy_before": accuracy_before,
        "pairwise_accuracy_after": accuracy_after,
        "resumed_from_step": resume_step,
    }
    if main:
        if accuracy_after is not None:
            curves.log(trainer.state.global_step, {"eval_pairwise_accuracy": accuracy_after})
        tr.save_model(out, STAGE, cfg, metrics, final, tokenizer)
    return metrics, checkpoints


# model -> its curve in reports/reward/ (the proxy's keeps the name every training stage's curve has)
CURVES = {"proxy": "curves.csv", "judge": "curves_judge.csv"}


def run(cfg: RewardConfig, paths: Paths, train: TrainConfig) -> dict[str, Any]:
    main = os.environ.get("RANK", "0") == "0"
    records = read_records(paths.dedup, "preferences")
    by_part: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
    unsplit = 0
    for r in records:
        if r.get(SPLIT) in by_part:
            by_part[r[SPLIT]].append(r)
        else:
            unsplit += 1
    backbone = backbone_path(cfg, paths)
    trained = {name: train_one(name, by_part[part], cfg, paths, train, backbone, main)
               for name, (part, _) in MODELS.items()}
    models = {name: metrics for name, (metrics, _) in trained.items()}
    if main:
        for _, checkpoints in trained.values():
            checkpoints.finish()
        if not train.keep_checkpoints:  # the models' folders are gone: the stage's goes too
            with contextlib.suppress(OSError):
                (Path(train.checkpoints) / STAGE).rmdir()

    # every record read is accounted for: trained or held out by a model, dropped by one, or another part's
    dropped: Counter[str] = Counter({f"{part}_part": len(by_part[part]) for part in PARTS
                                     if part not in {p for p, _ in MODELS.values()} and by_part[part]})
    dropped.update({"no_split": unsplit} if unsplit else {})
    for m in models.values():
        dropped.update(m["dropped"])
    return {
        "docs_in": len(records),
        "docs_out": sum(m["docs_out"] for m in models.values()),
        "dropped": dict(sorted(dropped.items())),
        "backbone": cfg.backbone,
        "method": cfg.method,
        **models,
        "resumed_from_step": max(m["resumed_from_step"] for m in models.values()),
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, RewardConfig, run, argv, training=TrainConfig)


if __name__ == "__main__":
    sys.exit(main())
