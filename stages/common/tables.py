"""The evaluation table as people read it: `table.md` (value ± standard error, then each row against
the one before it) and `chart.png` (one panel per metric, a bar per row, error bars)."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

Table = dict[str, dict[str, float]]


def _number(value: float, large: bool) -> str:
    return f"{value:.2f}" if large else f"{value:.3f}"


def cell_text(value: float, error: float | None, large: bool) -> str:
    if error is None or math.isnan(error):
        return _number(value, large)
    return f"{_number(value, large)} ± {_number(error, large)}"


def markdown(values: Table, errors: Table, columns: list[str], metric_names: dict[str, str], skipped: dict[str, str],
             seen: dict[str, dict[str, int]] | None = None, comparisons: dict[str, dict[str, Any]] | None = None,
             *, lower_is_better: Collection[str] = ()) -> str:
    seen = {t: s for t, s in (seen or {}).items() if s["seen"]}
    head = "| model | " + " | ".join(
        f"{c} ({metric_names.get(c, '-')}{', lower is better' if c in lower_is_better else ''})"
        f"{' †' if c in seen else ''}" for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    for row, scores in values.items():
        cells = []
        for col in columns:
            if col in scores:
                large = scores[col] >= 10
                cells.append(cell_text(scores[col], errors.get(row, {}).get(col), large))
            else:
                cells.append("skipped" if f"{row}/{col}" in skipped or row in skipped or col in skipped else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Value ± standard error over the held-out items."]
    if comparisons:
        lines += ["", "Each row against the one before it: the paired difference (row minus the other, over the "
                  "same items) and its bootstrap interval; `better` when the interval lies on the better side "
                  "of zero (for perplexity the difference is in log perplexity).", "",
                  "| model | against | metric | difference | interval | better |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row, found in comparisons.items():
            for metric, c in found.items():
                if metric == "against":
                    continue
                if "diff" not in c:  # a win rate: a share, not a difference; above 0.5 is better
                    shown, interval = f"{c['value']:.3f}", f"[{c['low']:.3f}, {c['high']:.3f}]"
                else:
                    shown, interval = f"{c['diff']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]"
                lines.append(f"| {row} | {found['against']} | {metric} | {shown} | {interval} | "
                             f"{'yes' if c['better'] else 'no'} |")
    if seen:
        lines += ["", "† items found in the training data (a shared run of words): "
                  + ", ".join(f"{t} {s['seen']} of {s['checked']}" for t, s in seen.items())]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def bar_chart(values: Table, errors: Table, columns: list[str], out: Path, *,
              lower_is_better: Collection[str] = ()) -> None:
    """One panel per metric (their scales differ), a bar per row with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(values)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, col in zip(axes[0], columns):
        heights = [values[r].get(col, math.nan) for r in rows]
        yerr = [errors.get(r, {}).get(col, 0.0) for r in rows]
        yerr = [0.0 if e is None or math.isnan(e) else e for e in yerr]
        ax.bar(range(len(rows)), heights, yerr=yerr, capsize=3,
               color=[colors[i % len(colors)] for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right", fontsize=8)
        ax.set_title(col + (" (lower is better)" if col in lower_is_better else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
