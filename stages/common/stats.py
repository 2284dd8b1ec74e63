"""Uncertainty of a score and of the difference between two models' scores, on the same items.

A benchmark score is a mean over items, so it carries a standard error; two models scored on the
same items differ item by item, so their difference is judged on the paired differences, which
cancel the items' own difficulty (a far tighter interval than comparing two error bars). The
interval is a percentile bootstrap over items: resample the items with
replacement, recompute the mean difference, take the middle `level` of those means. evaluate reports
it for each model against the one before it; the champion gate decides with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Comparison:
    """`b - a` over the items both models were scored on."""

    diff: float
    """Mean over items of b's value minus a's."""
    low: float
    """Lower end of the bootstrap interval of `diff`."""
    high: float
    """Upper end of the interval."""
    n: int
    """Items both were scored on."""
    level: float
    """Coverage of the interval (0.95: a 95% interval)."""

    @property
    def significant(self) -> bool:
        """The interval excludes zero: the models differ beyond the items' noise."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-item values; the error of one item is nan."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """The values of the items both `a` and `b` hold (item id -> value), in one order."""
    common = sorted(set(a) & set(b))
    return [a[k] for k in common], [b[k] for k in common]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, iters: int, seed: int,
                     level: float = 0.95) -> Comparison:
    """Mean of `b - a` over paired items and its percentile bootstrap interval."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError("no items in common to compare")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(iters, len(diffs)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Comparison(diff=float(diffs.mean()), low=float(low), high=float(high), n=len(diffs), level=level)


def compare(a: Mapping[str, float], b: Mapping[str, float], *, iters: int, seed: int,
            level: float = 0.95) -> Comparison:
    """`paired_bootstrap` over the items (id -> value) both models were scored on."""
    return paired_bootstrap(*paired(a, b), iters=iters, seed=seed, level=level)


def win_rate(a: Mapping[str, float], b: Mapping[str, float], *, iters: int, seed: int,
             level: float = 0.95) -> dict[str, Any]:
    """Share of the common items where b scores above a (a tie counts half), with its bootstrap
    interval; `better` when the interval lies above one half."""
    x, y = paired(a, b)
    wins = [1.0 if v > u else 0.5 if v == u else 0.0 for u, v in zip(x, y)]
    w = paired_bootstrap([0.5] * len(wins), wins, iters=iters, seed=seed, level=level)
    return {"value": 0.5 + w.diff, "low": 0.5 + w.low, "high": 0.5 + w.high, "n": w.n, "better": w.low > 0}
