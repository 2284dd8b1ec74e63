"""The champion gate: does a challenger replace the champion? Arithmetic only, no I/O.

Both models are scored in one run on the same items (`stages.evaluate` writes each row's per-item
values), so every metric is judged on the paired differences (`stages.common.stats.compare`):

- a metric that a scorer of the evaluation (the judge, `judge_score`; the proxy, `proxy_reward`)
  gives is only believed when that scorer is: its pairwise accuracy on the preference data's test
  pairs must have its interval above 0.5. When it does not, the gate cannot decide: the champion
  stays, and the reason says why;
- the primary metric must improve by at least `margin`, with the lower end of the interval of
  the improvement above zero: better by the margin, and better beyond the items' noise;
- a guard metric fails when it is significantly worse than the champion's beyond its tolerance: the
  whole interval of the paired difference lies on the worse side of the tolerance (a guard is a
  price the team accepts up to a point; it refuses once the items show, beyond their noise, that the
  price was exceeded);
- every interval is the paired bootstrap's at `evaluate.confidence`;
- every floor must hold on the challenger's own value (with no champion yet, the floors alone
  decide, so the first model must be good enough to serve);
- a metric the challenger (or the champion, for a comparison) lacks fails the gate: no decision
  is ever made on a missing column.

Both sides are scored by the same scorers in the same run (`flows/retrain.py`): the current run's
judge, which neither the candidate nor the champion was optimized against.

"Improvement" is signed so that bigger is better whatever the metric: for a metric where lower is
better (`perplexity`, `instruction_loss`) it is the champion's value minus the challenger's.
`perplexity` compares per-block log losses (evaluate's items), so its margin and tolerance are in
log-perplexity; its floor is on the perplexity itself, as the table shows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import stats
from stages.common.config import StageConfig
from stages.common.scores import LOWER_IS_BETTER, PAIRWISE, SCORERS

Items = Mapping[str, Mapping[str, float]]  # metric -> item id -> value
SCORED_BY = {column: row for row, (_, column) in SCORERS.items()}  # metric -> the scorer row it needs
CHANCE = 0.5


class PrimaryConfig(StageConfig):
    """The metric a challenger must win on."""

    metric: str = Field(min_length=1)
    """A column of the evaluation table (`judge_score`, `instruction_loss`, an lm-eval task...)."""
    margin: float = Field(ge=0)
    """How much better the challenger must be (in the metric's units; log-perplexity for perplexity)."""


class GateConfig(StageConfig):
    """The rule that moves `champion`."""

    primary: PrimaryConfig
    guards: dict[str, float]
    """metric -> how much worse than the champion the challenger may be (>= 0, the metric's units;
    `{}`: no guard)."""
    floors: dict[str, float]
    """metric -> the value a model must reach to be champion at all: at least this (higher is
    better) or at most this (lower is better, e.g. perplexity)."""

    @field_validator("guards")
    @classmethod
    def _tolerances(cls, guards: dict[str, float]) -> dict[str, float]:
        bad = {m: t for m, t in guards.items() if not t >= 0}
        if bad:
            raise ValueError(f"a tolerance is how much worse a guard may get, >= 0: {bad}")
        return guards


@dataclass(frozen=True)
class Bootstrap:
    """The paired interval's settings: evaluate's own (`evaluate.bootstrap_iters`, `confidence`,
    `seed`), so the gate and the table agree on every difference."""

    iters: int
    level: float
    seed: int


@dataclass
class Check:
    """One line of the decision."""

    metric: str
    role: Literal["scorer", "primary", "guard", "floor"]
    passed: bool
    reason: str
    threshold: float
    """The margin (primary), the tolerance (guard), the floor, or chance (a scorer's accuracy)."""
    challenger: float | None = None
    """The challenger's value (mean over items; for a floor, the table's value)."""
    champion: float | None = None
    improvement: float | None = None
    """Mean paired improvement (bigger is better whatever the metric)."""
    low: float | None = None
    high: float | None = None
    """The interval of `improvement`."""
    n: int | None = None
    """Items both models were scored on."""


@dataclass
class Decision:
    promote: bool
    reason: str
    """One sentence: why."""
    checks: list[Check] = field(default_factory=list)
    decided: bool = True
    """False when a scorer the rule needs is no better than chance: the gate could not decide."""

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "decided": self.decided, "reason": self.reason,
                "checks": [asdict(c) for c in self.checks]}


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def improvement(boot: Bootstrap, metric: str, champion: Items, challenger: Items) -> stats.Comparison | None:
    """The challenger's paired improvement over the champion on `metric` (None: a side lacks it,
    or they share no item)."""
    a, b = champion.get(metric), challenger.get(metric)
    if not a or not b or not set(a) & set(b):
        return None
    c = stats.compare(a, b, iters=boot.iters, seed=boot.seed, level=boot.level)
    if lower_is_better(metric):  # the champion's value minus the challenger's
        return stats.Comparison(-c.diff, -c.high, -c.low, c.n, c.level)
    return c


def _mean(items: Mapping[str, float] | None) -> float | None:
    return sum(items.values()) / len(items) if items else None


def compared(boot: Bootstrap, metric: str, role: Literal["primary", "guard"], threshold: float,
             champion: Items, challenger: Items) -> Check:
    c = improvement(boot, metric, champion, challenger)
    means = {"challenger": _mean(challenger.get(metric)), "champion": _mean(champion.get(metric))}
    if c is None:
        missing = [side for side, v in means.items() if v is None] or ["both (no common item)"]
        return Check(metric, role, False, f"{metric} is missing for the {' and '.join(missing)}", threshold, **means)
    found = {"improvement": c.diff, "low": c.low, "high": c.high, "n": c.n, **means}
    if role == "primary":
        if c.diff < threshold:
            reason = f"{metric} improves by {c.diff:+.4g}, less than the margin {threshold:g}"
        elif not c.low > 0:
            reason = (f"{metric} improves by {c.diff:+.4g} but its {boot.level:.0%} interval "
                      f"[{c.low:+.4g}, {c.high:+.4g}] reaches zero")
        else:
            return Check(metric, role, True, f"{metric} improves by {c.diff:+.4g} "
                         f"[{c.low:+.4g}, {c.high:+.4g}], margin {threshold:g}", threshold, **found)
        return Check(metric, role, False, reason, threshold, **found)
    interval = f"[{-c.high:+.4g}, {-c.low:+.4g}]"  # of the worsening, as the reason states it
    if c.high < -threshold:
        return Check(metric, role, False, f"{metric} worsens by {-c.diff:.4g} {interval}, beyond the tolerance "
                     f"{threshold:g} over its whole {boot.level:.0%} interval", threshold, **found)
    return Check(metric, role, True, f"{metric} changes by {c.diff:+.4g} (worsening {interval}, tolerance "
                 f"{threshold:g})", threshold, **found)


def scorer_check(boot: Bootstrap, row: str, accuracy: Mapping[str, float] | None) -> Check:
    """Whether scorer `row` (its per-pair correctness on the test pairs) is better than chance beyond
    the noise, so that the metrics it gives can decide."""
    metric = f"{row}.{PAIRWISE}"
    if not accuracy:
        return Check(metric, "scorer", False, f"the {row}'s pairwise accuracy is missing", CHANCE)
    c = stats.compare({k: CHANCE for k in accuracy}, accuracy, iters=boot.iters, seed=boot.seed, level=boot.level)
    found = {"challenger": CHANCE + c.diff, "improvement": c.diff, "low": CHANCE + c.low, "high": CHANCE + c.high,
             "n": c.n}
    shown = f"{CHANCE + c.diff:.3f} [{CHANCE + c.low:.3f}, {CHANCE + c.high:.3f}] on {c.n} test pairs"
    if c.low > 0:
        return Check(metric, "scorer", True, f"the {row}'s pairwise accuracy {shown} clears chance", CHANCE, **found)
    return Check(metric, "scorer", False, f"the {row}'s pairwise accuracy {shown} does not clear chance ({CHANCE:g})",
                 CHANCE, **found)


def floor(metric: str, bound: float, values: Mapping[str, float]) -> Check:
    value = values.get(metric)
    if value is None or not math.isfinite(value):
        return Check(metric, "floor", False, f"{metric} is missing for the challenger", bound)
    low = lower_is_better(metric)
    ok = value <= bound if low else value >= bound
    word = "at most" if low else "at least"
    return Check(metric, "floor", ok, f"{metric} is {value:.4g}, {word} {bound:g} {'holds' if ok else 'fails'}",
                 bound, challenger=value)


def decide(cfg: GateConfig, boot: Bootstrap, challenger: Items, values: Mapping[str, float],
           champion: Items | None, scorers: Mapping[str, Mapping[str, float]] | None = None) -> Decision:
    """Whether the challenger (its per-item values and its table row `values`) replaces the
    champion (its per-item values on the same items; None: there is no champion yet). `scorers`:
    scorer row (`judge`, `proxy`) -> its per-pair correctness on the test pairs, which a metric it
    gives needs (a missing one: the gate cannot decide on that metric)."""
    checks = [floor(m, b, values) for m, b in cfg.floors.items()]
    if champion is not None:
        checks.insert(0, compared(boot, cfg.primary.metric, "primary", cfg.primary.margin, champion, challenger))
        checks += [compared(boot, m, "guard", t, champion, challenger) for m, t in cfg.guards.items()]
    needed = dict.fromkeys(SCORED_BY[c.metric] for c in checks if c.metric in SCORED_BY)
    trust = [scorer_check(boot, row, (scorers or {}).get(row)) for row in needed]
    checks = trust + checks
    untrusted = [c for c in trust if not c.passed]
    if untrusted:
        return Decision(False, "cannot decide, kept the champion: " + "; ".join(c.reason for c in untrusted)
                        + " (its scores would be noise)", checks, decided=False)
    failed = [c for c in checks if not c.passed]
    if failed:
        return Decision(False, "kept the champion: " + "; ".join(c.reason for c in failed) if champion is not None
                        else "no champion named: " + "; ".join(c.reason for c in failed), checks)
    if champion is None:
        return Decision(True, "first champion: every floor holds", checks)
    return Decision(True, "new champion: " + next(c.reason for c in checks if c.role == "primary"), checks)
