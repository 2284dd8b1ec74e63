"""The keys of one stage's section that another stage reads, declared once: the owning stage's
config is the part plus its own keys (`class CleanConfig(CleanLimits, StageConfig)`), the reading
stage names the part in its `READS`, and the retraining flow loads the parts it needs. (The
evaluation sets, which three stages read, are `stages.common.benchmarks.EvaluationSets`.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

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


RESERVED_ALIASES = ("champion",)  # moved only by the retraining flow's rule


class RegisteredModel(SectionPart):
    """What the retraining flow reads of the `register` section: where the candidate is registered."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registered model name of the final model; quantized variants register as `<name>-<method>`."""
    alias: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Alias set on the version that holds the current model (`champion` is the retraining flow's)."""

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias: str) -> str:
        if alias in RESERVED_ALIASES:
            raise ValueError(f"`{alias}` moves only by the retraining flow's rule, not at registration")
        if alias == "latest" or re.fullmatch(r"v\d+", alias):
            raise ValueError("MLflow reserves `latest` and `v<number>` (they name versions)")
        return alias


class Bootstrapping(SectionPart):
    """What the champion gate reads of the `evaluate` section: how evaluate's comparisons resample,
    so that the gate's intervals are evaluate's."""

    bootstrap_iters: int = Field(ge=100)
    """Resamples of the paired bootstrap (and of lm-eval's standard errors where it bootstraps)."""
    confidence: float = Field(gt=0.5, lt=1.0)
    """Coverage of each comparison's interval."""
    seed: int
    """Seed of the bootstrap."""
