"""dpo: align the SFT model on preference pairs offline: DPO, KTO, ORPO or SimPO (TRL).

Reads `models/sft/` and `data/reference/` (the `policy` part of the preference pairs with the sft
model's log-probabilities, which it checks were scored by this sft model). Writes `models/dpo/`
(full, LoRA or QLoRA, merged) and `reports/dpo/` (`metrics.json`: held-out accuracy before and after;
`curves.csv`; `samples.jsonl`). README's "Aligning the model" says what each `algorithm` optimizes.

    python -m stages.dpo [--params params.yaml]
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stages.common import policy_pairs
from stages.common import training as tr
from stages.common.config import Paths, StageError
from stages.common.io import id_hash, is_val, write_jsonl
from stages.common.lm import greedy, load_chat_tokenizer
from stages.common.policy_pairs import Pair
from stages.common.preferences import pair_messages
from stages.common.runner import run_stage
from stages.common.training import TrainConfig, TrainerKnobs

log = logging.getLogger("llm_forge.dpo")

STAGE = "dpo"
# TRL DPOTrainer's loss types (DPOConfig.loss_type)
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class DpoConfig(TrainerKnobs):
    """The `dpo` section: the shared Trainer knobs (stages/common/training.py) plus these."""

    algorithm: Literal["dpo", "kto", "orpo", "simpo"]
    """dpo / kto: TRL's DPOTrainer / KTOTrainer against the cached reference; orpo / simpo:
    reference-free, trl.experimental's ORPOTrainer / CPOTrainer (loss_type simpo)."""
    method: Literal["full", "lora", "qlora"]
    """full: every weight trains; lora: low-rank adapters; qlora: adapters on a 4-bit NF4 base."""
    beta: float = Field(gt=0)
    """dpo, kto: how far the policy may move from the sft model (higher: less); orpo: lambda, the
    weight of the odds-ratio term; simpo: the scale of the length-normalised reward."""
    loss_type: list[DpoLoss] = Field(min_length=1)
    """dpo: TRL's DPO loss (several are summed with `loss_weights`: [sigmoid, sft] is RPO)."""
    loss_weights: list[float] | None
    """dpo: the weight of each `loss_type` (null: 1 each)."""
    label_smoothing: float = Field(ge=0, lt=0.5)
    """dpo robust / simpo: the assumed probability that a pair's preference is flipped."""
    desirable_weight: float = Field(gt=0)
    """kto: weight of the loss on chosen (desirable) answers."""
    undesirable_weight: float = Field(gt=0)
    """kto: weight of the loss on rejected (undesirable) answers."""
    simpo_gamma: float = Field(ge=0)
    """simpo: the target margin between the chosen and the rejected reward."""
    cpo_alpha: float = Field(ge=0)
    """simpo: weight of the negative log-likelihood of the chosen answers (0: SimPO as published)."""
    samples: int = Field(ge=0)
    """Held-out prompts whose greedy answers (before and after training) go to `samples.jsonl`."""
    sample_max_new_tokens: int = Field(ge=1)
    """Length of each sample answer, in tokens."""

    @model_validator(mode="after")
    def _consistent(self) -> DpoConfig:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights {self.loss_weights} must give one weight per loss_type {self.loss_type}")
        if self.algorithm == "kto" and self.batch_size < 2:
            raise ValueError("batch_size: kto estimates its KL term from the other answers of a batch: use 2 or more")
        return self


# --- data -------------------------------------------------------------------------------------


def load_pairs(paths: Paths, tokenizer: Any) -> tuple[list[Pair], dict[str, tuple[float, float]]]:
    """The scored pairs, tokenized here, and id -> (ref chosen, ref rejected) log-probs; an error
    when another sft model scored them or they tokenize otherwise (another tokenizer or template)."""
    rows, meta = policy_pairs.read_scored(paths.reference)
    if meta.get("sft_md5") != policy_pairs.model_hash(paths.sft):
        raise StageError(f"{paths.reference} holds the log-probs of another sft model than {paths.sft}: "
                         "run the reference stage again")
    pairs, ref = [], {}
    for r in rows:
        chosen, rejected = (policy_pairs.tokenize(tokenizer, r["prompt"], a) for a in (r["chosen"], r["rejected"]))
        if chosen is None or rejected is None or (len(chosen[0]), len(chosen[1]), len(rejected[1])) != (
                r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]):
            raise StageError(f"pair {r['id']} of {paths.reference} tokenizes otherwise with the tokenizer of "
                             f"{paths.sft}: run the reference stage again")
        (prompt_ids, chosen_ids), (_, rejected_ids) = chosen, rejected
        pairs.append(Pair(r["id"], r["source"], r["prompt"], r["chosen"], r["rejected"], prompt_ids, chosen_ids,
                          rejected_ids))
        ref[r["id"]] = (r["ref_chosen_logps"], r["ref_rejected_logps"])
    return pairs, ref


def split(pairs: list[Pair], cfg: DpoConfig) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) by a salted hash of the id; held-out pairs in hash order."""
    val = sorted((p for p in pairs if is_val(p.id, cfg.split_salt, cfg.val_fraction)),
                 key=lambda p: id_hash(p.id, cfg.split_salt))
    held = {p.id for p in val}
    return [p for p in pairs if p.id not in held], val


def paired_rows(pairs: list[Pair], ref: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """DPO / ORPO / SimPO examples: conversational prompt, chosen and rejected (and the cached
    reference log-probs, which only DPO reads)."""
    return [{**pair_messages(p.prompt, p.chosen, p.rejected),
             "ref_chosen_logps": ref[p.id][0], "ref_rejected_logps": ref[p.id][1]} for p in pairs]


def unpaired_rows(pairs: list[Pair], ref: dict[str, tuple[float, float]], seed: int) -> list[dict[str, Any]]:
    """KTO examples: each pair as a desirable and an undesirable answer with its cached log-prob,
    in a seeded order (KTO reads them in order: its KL estimate pairs each prompt with the answer
    before it in its batch, and a batch should mix both labels)."""
    rows = []
    for p in pairs:
        messages = pair_messages(p.prompt, p.chosen, p.rejected)
        rows += [{"prompt": messages["prompt"], "completion": messages[side], "label": side == "chosen",
                  "ref_logps": logp} for side, logp in zip(("chosen", "rejected"), ref[p.id])]
    random.Random(seed).shuffle(rows)
    return rows


# --- trainers -----------------------------------------------------------------------------------


def build_trainer(cfg: DpoConfig, model: Any, tokenizer: Any, train_pairs: list[Pair], val_pairs: list[Pair],
                  ref: dict[str, tuple[float, float]], output_dir: Path, precision: str) -> Any:
    """The TRL trainer of `cfg.algorithm` on the pairs (the reference log-probs from the cache)."""
    from datasets import Dataset

    peft = tr.peft_config(cfg.lora, "CAUSAL_LM") if cfg.method != "full" else None
    common = {"model": model, "processing_class": tokenizer, "peft_config": peft}

    def args(config_cls: type, **extra: Any) -> Any:
        return tr.trainer_arguments(config_cls, cfg, output_dir, precision, bool(val_pairs), **extra)

    def datasets(rows: Any) -> dict[str, Any]:
        # TRL's own evaluation only runs every `eval_steps`; the stage scores the held-out pairs itself
        evaluated = val_pairs and cfg.eval_steps
        return {"train_dataset": Dataset.from_list(rows(train_pairs)),
                "eval_dataset": Dataset.from_list(rows(val_pairs)) if evaluated else None}

    if cfg.algorithm == "dpo":
        from trl import DPOConfig

        return cached_reference_dpo()(
            args=args(DPOConfig, beta=cfg.beta, loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights,
                      label_smoothing=cfg.label_smoothing, precompute_ref_log_probs=True, max_length=None),
            **datasets(lambda ps: paired_rows(ps, ref)), **common)
    if cfg.algorithm == "kto":
        from trl import KTOConfig

        return cached_reference_kto()(
            args=args(KTOConfig, beta=cfg.beta, loss_type="kto", desirable_weight=cfg.desirable_weight,
                      undesirable_weight=cfg.undesirable_weight, precompute_ref_log_probs=True, max_length=None,
                      train_sampling_strategy="sequential"),
            **datasets(lambda ps: unpaired_rows(ps, ref, cfg.seed)), **common)
    # ORPO and CPO tokenize the rendered text themselves (adding BOS / EOS where missing): a little
    # room above the longest pair, so that they never cut one
    longest = max(p.length for p in train_pairs + val_pairs) + 4
    text_rows = lambda ps: [{k: v for k, v in row.items() if not k.startswith("ref_")}  # noqa: E731
                            for row in paired_rows(ps, ref)]
    if cfg.algorithm == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(args=args(ORPOConfig, beta=cfg.beta, max_length=longest, remove_unused_columns=False),
                           **datasets(text_rows), **common)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(args=args(CPOConfig, loss_type="simpo", beta=cfg.beta, simpo_gamma=cfg.simpo_gamma,
                                cpo_alpha=cfg.cpo_alpha, label_smoothing=cfg.label_smoothing, max_length=longest,
                                remove_unused_columns=False),
                      **datasets(text_rows), **common)


def cached_reference_dpo() -> type:
    """TRL's DPOTrainer that takes `ref_chosen_logps` / `ref_rejected_logps` from its dataset (the
    reference stage's cache) instead of running the reference model over it."""
    from trl import DPOTrainer

    class CachedReferenceDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return CachedReferenceDPOTrainer


def cached_reference_kto() -> type:
    """TRL's KTOTrainer that takes `ref_logps` from its dataset (the reference stage's cache). Its
    KL estimate pairs each prompt with another example's answer, which depends on the batches, so
    those mismatched pairs are scored here, as TRL scores them, by the model before training (the
    sft model: with adapters, their zero initialisation)."""
    import torch
    from torch.utils.data import DataLoader
    from trl import KTOTrainer
    from trl.trainer.utils import selective_log_softmax

    class CachedReferenceKTOTrainer(KTOTrainer):
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if "ref_logps" not in dataset.column_names:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            if not self.calculate_KL:
                return dataset
            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            kl_logps = []
            with torch.no_grad():
                for batch in loader:
                    ids = batch["KL_input_ids"].to(self.accelerator.device)
                    mask = batch["KL_attention_mask"].to(self.accelerator.device)
                    per_token = selective_log_softmax(model(ids, attention_mask=mask).logits[:, :-1, :], ids[:, 1:])
                    per_token[batch["KL_completion_mask"][:, 1:].to(per_token.device) == 0] = 0.0
                    kl_logps.extend(per_token.sum(-1).float().cpu().tolist())
            model.train(was_training)
            return dataset.add_column("ref_KL_logps", kl_logps)

    return CachedReferenceKTOTrainer


# --- held-out scores ------------------------------------------------------------------------------


def heldout_scores(cfg: DpoConfig, pairs: list[Pair], logps: list[float],
                   ref: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`accuracy`: the share of pairs whose chosen answer the algorithm's implicit reward ranks
    above the rejected one (a tie counts half); `logp_accuracy`: the same by the mean log-prob per
    token; `margin`: the mean implicit-reward difference. `logps`: the policy's (chosen, rejected)
    sums, pair after pair."""
    def share(diffs: list[float]) -> float:
        return round(sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs), 4)

    per_token, reward = [], []
    for i, p in enumerate(pairs):
        chosen, rejected = logps[2 * i], logps[2 * i + 1]
        mean_c, mean_r = chosen / len(p.chosen_ids), rejected / len(p.rejected_ids)
        per_token.append(mean_c - mean_r)
        if cfg.algorithm in ("dpo", "kto"):
            reward.append(cfg.beta * ((chosen - ref[p.id][0]) - (rejected - ref[p.id][1])))
        else:
            reward.append(cfg.beta * (mean_c - mean_r))
    return {"accuracy": share(reward), "logp_accuracy": share(per_token),
            "margin": round(sum(reward) / len(reward), 4)}


def policy_logps(model: Any, pairs: list[Pair], tokenizer: Any) -> list[float]:
    rows = [(p.prompt_ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    return policy_pairs.answer_logps(model, rows, 8, tokenizer.pad_token_id)


# --- stage ------------------------------------------------------------------------------------


def run(cfg: DpoConfig, paths: Paths, train: TrainConfig) -> dict[str, Any]:
    if not (Path(paths.sft) / "config.json").is_file():
        raise StageError(f"{paths.sft} holds no model (config.json): run the sft stage first")
    main = os.environ.get("RANK", "0") == "0"
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    # setup: the scored pairs, split; the policy; the trainer of the algorithm
    tokenizer = load_chat_tokenizer(paths.sft, policy_pairs.RENDERED)
    pairs, ref = load_pairs(paths, tokenizer)
    train_pairs, val_pairs = split(pairs, cfg)
    if not train_pairs:
        raise StageError(f"{paths.reference} leaves no pair to train on ({len(pairs)} pairs, "
                         f"{len(val_pairs)} held out)")
    log.info("%s (%s): %d train, %d held-out pairs", cfg.algorithm, cfg.method, len(train_pairs), len(val_pairs))
    tr.seed_everything(cfg.seed)
    precision = tr.resolve_precision(train.precision)
    model = tr.load_trainable_lm(paths.sft, cfg.method, precision, STAGE)
    sample_prompts = [pair_messages(p.prompt, p.chosen, p.rejected)["prompt"]
                      for p in (val_pairs or train_pairs)[: cfg.samples]]
    before = greedy(model, tokenizer, sample_prompts, cfg.sample_max_new_tokens) if main else []
    checkpoints = tr.Checkpoints(train, STAGE, cfg, paths.sft, paths.reference, main=main)
    resume_path, resume_step = checkpoints.last()
    trainer = build_trainer(cfg, model, tokenizer, train_pairs, val_pairs, ref, checkpoints.dir, precision)
    sizes = tr.count_parameters(trainer.model)

    # train: the held-out scores before (the sft model: its log-probs are the cached ones) and after
    ref_logps = [x for p in val_pairs for x in ref[p.id]]
    score_before = heldout_scores(cfg, val_pairs, ref_logps, ref) if val_pairs else {}
    curves = tr.Curves(paths.report_dir(STAGE))
    train_loss = tr.train_with_curves(trainer, curves, resume_path, resume_step, main,
                                      {"heldout_accuracy": score_before.get("accuracy")})
    merged = tr.merged_lm(trainer, cfg.method, paths.sft, checkpoints.dir / "final")
    after_logps = policy_logps(merged, val_pairs, tokenizer)
    score_after = heldout_scores(cfg, val_pairs, after_logps, ref) if val_pairs else {}
    if val_pairs:  # DPO's known drift: both answers lose likelihood, the chosen one less
        shifts = [(after_logps[2 * i] - ref[p.id][0]) / len(p.chosen_ids) for i, p in enumerate(val_pairs)]
        score_after["chosen_logp_shift"] = round(sum(shifts) / len(shifts), 4)

    # save: a plain full-precision model, its samples and metrics
    metrics: dict[str, Any] = {
        **tr.split_counts(len(pairs), train_pairs, val_pairs, {}),
        "algorithm": cfg.algorithm,
        "method": cfg.method,
        "beta": cfg.beta,
        "precision": precision,
        **sizes,
        **tr.loss_figures(trainer, train_loss),
        **{f"heldout_{k}_before": v for k, v in score_before.items()},
        **{f"heldout_{k}_after": v for k, v in score_after.items()},
        "resumed_from_step": resume_step,
    }
    if main:
        if score_after:
            curves.log(trainer.state.global_step, {"heldout_accuracy": score_after["accuracy"]})
        after = greedy(merged, tokenizer, sample_prompts, cfg.sample_max_new_tokens)
        write_jsonl(paths.report_dir(STAGE) / "samples.jsonl",
                    [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "before": b, "after": a}
                     for p, b, a in zip(val_pairs or train_pairs, before, after)])
        tr.save_model(paths.dpo, STAGE, cfg, metrics, merged, tokenizer)
        checkpoints.finish()
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, DpoConfig, run, argv, training=TrainConfig)


if __name__ == "__main__":
    sys.exit(main())
