"""The evaluation table's cells: a mean over held-out items with its standard error and the items
themselves, and each row's comparison with the row it is set against (`stages.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stages.common import stats
from stages.common.scores import LOWER_IS_BETTER, PAIRWISE, SCORERS, WIN_RATE
from stages.common.sections import Bootstrapping


@dataclass
class Cell:
    """One metric of one row: the mean over items, its standard error, and the items."""

    value: float
    stderr: float
    items: dict[str, float]


def mean_cell(items: dict[str, float]) -> Cell:
    value, stderr = stats.mean_stderr(list(items.values()))
    return Cell(value, stderr, items)


def perplexity_cell(losses: list[float]) -> Cell:
    """exp(mean block loss); its error by the delta method (d exp(x) = exp(x) dx). The items stay
    block losses, so comparisons are on log perplexity."""
    loss = mean_cell({str(i): v for i, v in enumerate(losses)})
    value = math.exp(min(loss.value, 50.0))
    return Cell(value, value * loss.stderr, loss.items)


def scored(scorer: Any, conversations: list[list[dict[str, str]]], answers: list[str]) -> list[float]:
    """`scorer`'s score of each (conversation, answer), all in one call, shortest first, so that a
    batch is not padded to one long prompt (the scores come back in the given order)."""
    def length(i: int) -> int:
        return sum(len(m["content"]) for m in conversations[i]) + len(answers[i])

    order = sorted(range(len(answers)), key=length)
    scores = [0.0] * len(answers)
    for i, value in zip(order, scorer([conversations[i] for i in order], [answers[i] for i in order])):
        scores[i] = value
    return scores


def pairwise_cell(scorer: Any, pairs: list[tuple[str, list[dict[str, str]], str, str]]) -> Cell:
    """1 for each test pair whose chosen answer `scorer` scores above the rejected one, else 0."""
    scores = scored(scorer, [m for _, m, _, _ in pairs] * 2, [c for *_, c, _ in pairs] + [r for *_, r in pairs])
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    return mean_cell({pid: float(c > r) for (pid, *_), c, r in zip(pairs, chosen, rejected)})


def predecessor(rows: list[str], row: str, against: dict[str, str] | None = None) -> str | None:
    """The row `row` is compared with: the one `against` names for it (when that row is in the
    table), else the one before it, or for `<group>/<name>` (a quantized variant) the last row
    before it outside its group (the model it was made from)."""
    if against and against.get(row) in rows and against[row] != row:
        return against[row]
    before = rows[: rows.index(row)]
    group = row.partition("/")[0] if "/" in row else None
    for other in reversed(before):
        if group is None or other.partition("/")[0] != group:
            return other
    return None


def compare_rows(table: dict[str, dict[str, Cell]], against: dict[str, str],
                 boot: Bootstrapping) -> dict[str, dict[str, Any]]:
    """row -> {against, metric -> the paired difference with its interval and verdict}; for the
    judge's and the proxy's scores also the paired win rate; the scorers' rows against chance.
    `against`: row -> the row it is compared with where not `predecessor`'s."""
    rows, out = list(table), {}
    for row in rows:
        if row in SCORERS:
            cell = table[row].get(PAIRWISE)
            if cell:
                c = stats.compare({k: 0.5 for k in cell.items}, cell.items, iters=boot.bootstrap_iters,
                                  seed=boot.seed, level=boot.confidence)
                out[row] = {"against": "chance", PAIRWISE: {**c.as_dict(), "better": c.low > 0}}
            continue
        prev = predecessor([r for r in rows if r not in SCORERS], row, against)
        if prev is None:
            continue
        found: dict[str, Any] = {"against": prev}
        for metric, cell in table[row].items():
            before = table[prev].get(metric)
            if before is None or not set(before.items) & set(cell.items):
                continue
            c = stats.compare(before.items, cell.items, iters=boot.bootstrap_iters, seed=boot.seed,
                              level=boot.confidence)
            better = c.high < 0 if metric in LOWER_IS_BETTER else c.low > 0
            found[metric] = {**c.as_dict(), "better": better}
            if metric in WIN_RATE:
                found[WIN_RATE[metric]] = stats.win_rate(before.items, cell.items, iters=boot.bootstrap_iters,
                                                         seed=boot.seed, level=boot.confidence)
        out[row] = found
    return out
