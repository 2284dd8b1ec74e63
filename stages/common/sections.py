"""The keys of one stage's section that another stage reads, declared once: the owning stage's
config is the part plus its own keys (`class CleanConfig(CleanLimits, StageConfig)`), the reading
stage names the part in its `READS`. (The evaluation sets, which three stages read, are
`stages.common.benchmarks.EvaluationSets`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.common.config import Paths, SectionPart


class CleanLimits(SectionPart):
    """What `validate` checks of the `clean` section: the limit clean applied."""

    max_chars: int = Field(gt=0)
    """Longest record in characters (all its text fields together); longer ones drop as too_long.
    `validate` checks the corpus against this same limit."""


class FinalModel(SectionPart):
    """What `register` reads of the `quantize` section: which aligned model ships."""

    model: Literal["dpo", "ppo"]
    """The aligned model that ships: quantized here and registered by `register` (both are evaluated)."""

    def final(self, paths: Paths) -> Path:
        """The folder of the final model."""
        return {"dpo": paths.dpo, "ppo": paths.ppo}[self.model]
