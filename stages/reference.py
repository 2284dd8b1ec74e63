"""reference: the sft model's log-probabilities of every answer of the policy's preference pairs, once.

Reads the `policy` part of `data/dedup/preferences/` and `models/sft/`; tokenizes each pair as TRL's
DPOTrainer does (`stages/common/policy_pairs.py`). Writes `data/reference/` (`pairs.parquet`: the
pairs with both answers' log-probs; `reference.json`: the sft model's hash, which `dpo` checks), so
an experiment on `dpo`'s params reruns the training but not this pass.

    python -m stages.reference [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common import policy_pairs
from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import atomic_dir, read_records
from stages.common.lm import load_chat_tokenizer
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.reference")

STAGE = "reference"


class ReferenceConfig(StageConfig):
    """The `reference` section: which of the policy's preference pairs are scored, and how."""

    max_length: int = Field(ge=8)
    """Longest prompt + answer in tokens (chat template included); longer pairs are skipped, not cut."""
    max_pairs: int | None = Field(ge=2)
    """Pairs kept at most, the first by a salted hash of their id (null: every usable pair)."""
    salt: str
    """Salt of the id hash that orders the pairs for `max_pairs`."""
    batch_size: int = Field(ge=1)
    """Sequences per forward pass of the sft model."""


def run(cfg: ReferenceConfig, paths: Paths) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.training import device

    source = Path(paths.dedup) / "preferences"
    if not (Path(paths.sft) / "config.json").is_file():
        raise StageError(f"{paths.sft} holds no model (config.json): run the sft stage first")
    records = read_records(paths.dedup, "preferences")
    policy, parts = policy_pairs.policy_records(records, str(source))
    tokenizer = load_chat_tokenizer(paths.sft, policy_pairs.RENDERED)
    pairs, dropped = policy_pairs.prepare_pairs(policy, tokenizer, cfg.max_length)
    if cfg.max_pairs is not None and len(pairs) > cfg.max_pairs:
        pairs = sorted(pairs, key=lambda p: policy_pairs.pair_order(p.id, cfg.salt))
        dropped["beyond_max_pairs"] = len(pairs) - cfg.max_pairs
        pairs = pairs[: cfg.max_pairs]
    if not pairs:
        raise StageError(f"{source} has no usable pair in its policy part ({len(records)} records, parts "
                         f"{parts}, dropped {dict(dropped)})")
    log.info("%d policy pairs of %d records (parts %s); dropped %s", len(pairs), len(records), parts, dict(dropped))

    model = AutoModelForCausalLM.from_pretrained(paths.sft, dtype=torch.float32).to(device())
    started = time.perf_counter()
    rows = [(p.prompt_ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    logps = policy_pairs.answer_logps(model, rows, cfg.batch_size, tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    tokens = sum(len(a) + len(b) for a, b in rows)

    table = pa.Table.from_pylist([
        {"id": p.id, "source": p.source, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
         "prompt_tokens": len(p.prompt_ids), "chosen_tokens": len(p.chosen_ids),
         "rejected_tokens": len(p.rejected_ids), "ref_chosen_logps": logps[2 * i],
         "ref_rejected_logps": logps[2 * i + 1]} for i, p in enumerate(pairs)])
    with atomic_dir(paths.reference) as tmp:
        pq.write_table(table, tmp / policy_pairs.PAIRS_FILE)
        meta = {"sft_md5": policy_pairs.model_hash(paths.sft), "pairs": len(pairs)}
        (tmp / policy_pairs.META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    chosen, rejected = logps[0::2], logps[1::2]
    return {
        "records": len(records),
        "parts": parts,
        "docs_in": len(policy),
        "docs_out": len(pairs),
        "dropped": dict(sorted(dropped.items())),
        "sequences": len(rows),
        "tokens": tokens,
        "score_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "mean_chosen_logp": round(sum(chosen) / len(chosen), 4),
        "mean_rejected_logp": round(sum(rejected) / len(rejected), 4),
        # the sft model's own preference, per token (a longer answer has a lower sum)
        "sft_prefers_chosen": round(sum(c / len(p.chosen_ids) > r / len(p.rejected_ids)
                                        for c, r, p in zip(chosen, rejected, pairs)) / len(pairs), 4),
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, ReferenceConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
