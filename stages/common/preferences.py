"""Preference pairs as every stage sees them: the part of the data each belongs to.

collect decides once, for every preference record, which part it is in (its `split` column), by a
salted hash of its normalized prompt, so that every pair of one prompt lands in the same part and
a prompt never trains one model and scores another:

- `reward`: the proxy reward model (`models/reward/`), the one RL optimizes;
- `judge`: the judge (`models/judge/`), which only `evaluate` and the champion gate use;
- `policy`: what offline preference optimization (DPO and its kin) trains on;
- `test`: held out from every model: the judge's and the proxy's pairwise accuracy, and the prompts
  every model of the evaluation table answers.

The column travels with the record through clean, decontam and dedup; an instruction record that
asks a `test` prompt is left out of the training data (collect), so that no model has practised
the prompts it is scored on.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import Field, model_validator

from stages.common.config import StageConfig
from stages.common.io import id_hash

Part = Literal["reward", "judge", "policy", "test"]
PARTS: tuple[Part, ...] = ("reward", "judge", "policy", "test")
REWARD, JUDGE, POLICY, TEST = PARTS
SPLIT = "split"
"""The column of every preference record that names its part."""


def normalize_prompt(prompt: str) -> str:
    """What the split hashes: the prompt in NFKC, case-folded, its whitespace runs one space (a
    prompt reworded only in case or spacing is the same prompt)."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


class PreferenceSplit(StageConfig):
    """How preference records are split into parts (`collect.preference_split`): the share of prompts
    in each part, in the order reward, judge, policy, test."""

    salt: str = Field(min_length=1)
    """Salt of the prompt hash (a new salt draws new parts)."""
    reward: float = Field(ge=0, le=1)
    """Share of prompts for the proxy reward model (what RL optimizes)."""
    judge: float = Field(ge=0, le=1)
    """Share of prompts for the judge (what evaluate and the gate score with)."""
    policy: float = Field(ge=0, le=1)
    """Share of prompts for offline preference optimization (DPO, KTO, ORPO, SimPO)."""
    test: float = Field(ge=0, le=1)
    """Share of prompts no model trains on: the judge's test pairs and the prompts the table's rows answer."""

    @model_validator(mode="after")
    def _shares_add_up(self) -> PreferenceSplit:
        total = sum(getattr(self, p) for p in PARTS)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"the shares of {', '.join(PARTS)} add up to {total:g}, not 1")
        return self

    def part(self, prompt: str) -> Part:
        """The part of every pair that asks `prompt`."""
        u = id_hash(normalize_prompt(prompt), self.salt)
        edge = 0.0
        for name in PARTS:
            edge += getattr(self, name)
            if u < edge:
                return name
        return next(p for p in reversed(PARTS) if getattr(self, p) > 0)  # u within rounding of 1


def pair_messages(prompt: str | list[dict[str, str]], chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    """A preference pair in TRL's conversational form: the prompt as messages (a string is one user
    turn; a list, the conversation up to the turn answered), each answer one assistant turn. Every
    stage that renders a pair through a chat template (reward, evaluate, preference optimization)
    starts from this, so that a pair is read as SFT trained on a conversation and as a chat is
    answered (TRL renders a pair whose prompt is a plain string without the chat template)."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def pair_texts(record: dict) -> tuple[tuple[str, str, str], str | None]:
    """A pair's prompt, chosen and rejected text, and why it cannot train (`empty_answer`,
    `identical_pair`) or None: the rule every stage that trains on pairs drops by."""
    prompt, chosen, rejected = record.get("prompt") or "", record.get("chosen") or "", record.get("rejected") or ""
    if not chosen.strip() or not rejected.strip():
        return (prompt, chosen, rejected), "empty_answer"
    if chosen.strip() == rejected.strip():
        return (prompt, chosen, rejected), "identical_pair"
    return (prompt, chosen, rejected), None
