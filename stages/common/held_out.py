"""The held-out sets `stages.evaluate` scores every row on: the val blocks of `data/tokenized`, the
instructions sft held out, and the preference data's `test` part with the judge and the proxy
that score answers to its prompts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import read_records
from stages.common.preferences import SPLIT, TEST, normalize_prompt, pair_messages
from stages.common.scores import INSTRUCTION_LOSS, PERPLEXITY, SCORERS

log = logging.getLogger("llm_forge.evaluate")  # its only reader is evaluate: the warnings are its


class PreferenceConfig(StageConfig):
    """The preference data's `test` part (no model trained on it), taken round robin over its sources."""

    prompts: int | None = Field(ge=2)
    """Distinct test prompts each row answers, scored by the judge and the proxy (null: all of them)."""
    pairs: int | None = Field(ge=2)
    """Test pairs the judge's and the proxy's pairwise accuracy are measured on (null: all of them)."""
    answer_tokens: int = Field(ge=1)
    """Greedy tokens of each answer."""


@dataclass
class Held:
    """The held-out sets every row is scored on (None: the metric is skipped, `skipped` says why)."""

    blocks: Any = None
    instructions: list[dict[str, Any]] | None = None
    pairs: list[tuple[str, list[dict[str, str]], str, str]] | None = None
    prompts: list[tuple[str, list[dict[str, str]]]] | None = None
    scorers: dict[str, Any] = field(default_factory=dict)
    """Scorer row (`SCORERS`) -> its `RewardScorer`, for those that load."""
    skipped: dict[str, str] = field(default_factory=dict)


def round_robin(groups: dict[str, list[Any]]) -> list[Any]:
    """The items of every group in turn (each group in its own order), so that a cut mixes them."""
    lists = list(groups.values())
    return [g[i] for i in range(max(map(len, lists), default=0)) for g in lists if i < len(g)]


def preference_items(cfg: PreferenceConfig, paths: Paths, held: Held) -> None:
    """The test pairs and the distinct test prompts of the preference data (collect's `test` part,
    as dedup left it), round robin over their sources, cut to `cfg.pairs` and `cfg.prompts`."""
    records = [r for r in read_records(paths.dedup, "preferences") if r.get(SPLIT) == TEST]
    if not records:
        reason = f"{paths.dedup} holds no preference pair of the {TEST} part"
        held.skipped.update({key: reason for row, (_, column) in SCORERS.items() for key in (row, column)})
        return
    pairs: dict[str, list[Any]] = {}
    prompts: dict[str, list[Any]] = {}
    asked: set[str] = set()
    for r in sorted(records, key=lambda r: r["id"]):
        messages = pair_messages(r["prompt"], r["chosen"], r["rejected"])["prompt"]
        pairs.setdefault(r["source"], []).append((r["id"], messages, r["chosen"], r["rejected"]))
        key = normalize_prompt(r["prompt"])
        if key not in asked:  # pairs that ask the same question are one prompt
            asked.add(key)
            prompts.setdefault(r["source"], []).append((r["id"], messages))
    held.pairs = round_robin(pairs)[: cfg.pairs]
    held.prompts = round_robin(prompts)[: cfg.prompts]


def load_scorers(paths: Paths, held: Held, batch_size: int) -> None:
    """The judge and the proxy as text scorers; one that is missing or does not load is a skip of its
    row and of its column in every model row."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.common.rl import RewardScorer

    for row, (key, column) in SCORERS.items():
        folder = Path(getattr(paths, key))
        if not (folder / "config.json").is_file():
            held.skipped[row] = held.skipped[column] = f"no {row} model in {folder}"
            continue
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                       dtype=torch.float32).eval()
            held.scorers[row] = RewardScorer(model, AutoTokenizer.from_pretrained(folder), batch_size)
        except (OSError, ValueError, RuntimeError) as err:  # a folder that is there but does not load
            held.skipped[row] = held.skipped[column] = (
                f"the {row} model in {folder} does not load: {type(err).__name__}: {str(err)[:200]}")


def held_out(paths: Paths, blocks: int | None, instructions: int | None, preferences: PreferenceConfig | None,
             batch_size: int) -> Held:
    """The held-out sets every row is scored on, cut to `blocks` val blocks, `instructions` of those
    sft held out and `preferences`' pairs and prompts (None: all; no `preferences`: none), and the
    scorers of the pairs (loaded for `batch_size`); each set that cannot be read is a skip."""
    from stages.common.lm import val_blocks

    held = Held()
    try:
        held.blocks = val_blocks(paths.tokenized, blocks)
    except StageError as err:
        held.skipped[PERPLEXITY] = str(err)
    sft_held_out = paths.sft_held_out()
    if not sft_held_out.is_file():
        held.skipped[INSTRUCTION_LOSS] = f"{sft_held_out} does not exist (sft writes it: run the sft stage)"
    else:
        with sft_held_out.open(encoding="utf-8") as f:
            val = [json.loads(line) for line in f if line.strip()][:instructions]
        held.instructions = val or None
        if not val:
            held.skipped[INSTRUCTION_LOSS] = "sft holds out no instruction (sft.val_fraction)"
    if preferences is not None:
        preference_items(preferences, paths, held)
    if held.pairs is not None:
        load_scorers(paths, held, batch_size)
    for metric, reason in held.skipped.items():
        log.warning("%s skipped: %s", metric, reason)
    return held
