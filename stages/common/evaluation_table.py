"""Evaluate's table (`reports/evaluate/metrics.json`) as `register` reads it: the row that scored a
model folder, that row's scores and a one-line verdict on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common.config import StageError
from stages.common.lineage import tag_key


def read_evaluation(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"evaluation table {path} does not exist (run the evaluate stage): a model is "
                         "registered with the scores it was judged by")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StageError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(table, dict) or not isinstance(table.get("models"), dict):
        raise StageError(f"{path} holds no `models` table (rows of benchmark scores)")
    if not isinstance(table.get("folders"), dict):
        raise StageError(f"{path} holds no `folders` (row -> model folder): rerun the evaluate stage")
    return table


def row_of(table: dict[str, Any], folder: Path) -> str | None:
    """The evaluation row that scored `folder`, by its path (rows are named in `evaluate.models`)."""
    return next((row for row, path in table["folders"].items() if Path(path).resolve() == Path(folder).resolve()),
                None)


def eval_metrics(table: dict[str, Any], row: str | None) -> dict[str, float]:
    """`<row>.<metric>` -> score of `row` (the pipeline run's names for the same figures)."""
    scores = (table["models"].get(row) or {}) if row is not None else {}
    return {tag_key(f"{row}.{k}"): float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def verdict(table: dict[str, Any], row: str | None) -> str:
    """One line: how the evaluation judged `row` against the row before it (by each metric's paired
    interval, at evaluate's confidence: better, worse, or no clear change), and the cells it could
    not score."""
    if row is None or row not in table["models"]:
        return "not evaluated (no row of the evaluation table scored this folder)"
    skipped = sorted(k for k in table.get("skipped") or {} if k == row or k.startswith(f"{row}/"))
    tail = f"; {len(skipped)} cell{'s' * (len(skipped) != 1)} skipped" if skipped else ""
    found = (table.get("comparisons") or {}).get(row) or {}
    metrics = {k: v for k, v in found.items() if isinstance(v, dict) and "better" in v}
    if not metrics:
        return f"scored on {len(table['models'][row])} metrics, no row before it to compare with{tail}"
    better = sorted(k for k, c in metrics.items() if c["better"])
    worse = sorted(k for k, c in metrics.items() if c.get("significant") and not c["better"])
    same = len(metrics) - len(better) - len(worse)
    level = round(100 * next(iter(metrics.values())).get("level", 0.95))
    parts = [f"better on {', '.join(better)}" if better else "", f"worse on {', '.join(worse)}" if worse else "",
             f"no clear change on {same}" if same else ""]
    return f"against {found.get('against')}: {'; '.join(p for p in parts if p)} ({level}% paired intervals){tail}"
