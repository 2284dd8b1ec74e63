"""The evaluation table as people read it: `table.md` (value ± standard error, then each row against
the one before it) and `chart.png` (each row against the one before it, per metric: what a team
decides on)."""

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
        lines += ["", "Each row against another (`against`: the row evaluate.against names, a quantized model's "
                  "original, else the row before it; a scorer against chance): the paired difference (row minus "
                  "the other, over the same items) and its bootstrap interval, or for a win rate the share of "
                  "items the row wins; `better` when the interval lies on the better side (for perplexity the "
                  "difference is in log perplexity).", "",
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


def with_chart(table: Path, chart: Path) -> str:
    """The chart, inline (a data URI), above the table's markdown: for a page that shows markdown
    and nothing else, such as a Prefect artifact."""
    import base64

    text = table.read_text(encoding="utf-8")
    if chart.is_file():
        text = f"![{chart.name}](data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()})\n\n{text}"
    return text


WIN_RATE = "_win_rate"  # `<scorer>_win_rate`: a share of paired answers, not a difference (no change is 0.5)
BETTER, WORSE, UNCLEAR = "#1a7f37", "#cf222e", "#6e7781"


def comparison_chart(comparisons: dict[str, dict[str, Any]], columns: list[str], out: Path, *,
                     lower_is_better: Collection[str] = ()) -> list[str]:
    """Each model against the row it is set against (`comparisons`, as evaluate computes them), one panel
    per metric in a grid: per pair, the paired difference as a point with its interval as a bar,
    around the line of no change; green when the interval lies on the better side (which is shaded
    and labelled), red on the worse side, grey across the line. A metric with nothing to show (no
    pair, or every pair identical item for item) gets no panel. Returns the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metrics = [c for c in columns if not _is_rate(c)]
    named = {m for found in comparisons.values() for m in found} - {"against", *metrics}
    for extra in sorted(named):  # a win rate beside the score it counts (`judge_win_rate` after `judge_score`)
        scorer = extra.removesuffix(WIN_RATE)
        beside = next((i for i, m in enumerate(metrics) if _is_rate(extra) and m.startswith(f"{scorer}_")), None)
        metrics.insert(len(metrics) if beside is None else beside + 1, extra)
    panels = []
    for metric in metrics:
        pairs = [(f"{row} vs {found['against']}" + (" (0.5)" if found["against"] == "chance" else ""), found[metric])
                 for row, found in comparisons.items()
                 if isinstance(found.get(metric), dict)]
        if pairs and any(_point(c, metric) != (_zero(metric),) * 3 for _, c in pairs):
            panels.append((metric, pairs))
    level = next((c["level"] for found in comparisons.values() for c in found.values()
                  if isinstance(c, dict) and "level" in c), 0.95)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "Nothing to compare: no model has one before it with a metric that differs.",
                ha="center", va="center", fontsize=10)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return []
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    tallest = max(len(pairs) for _, pairs in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, (0.42 * tallest + 1.5) * rows), squeeze=False)
    titles = [_panel(ax, metric, pairs, metric in lower_is_better) for ax, (metric, pairs) in zip(axes.flat, panels)]
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    marks = [Line2D([], [], color=color, marker="o", linewidth=2, label=label) for color, label in
             ((BETTER, "better: interval on the better side"), (WORSE, "worse: interval on the worse side"),
              (UNCLEAR, "no clear difference: interval across the line"))]
    fig.legend(handles=marks, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Each model against the row it is set against: paired difference and its {level:.0%} interval",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return titles


def _is_rate(metric: str) -> bool:
    return metric.endswith(WIN_RATE)


def _zero(metric: str) -> float:
    return 0.5 if _is_rate(metric) else 0.0


def _point(c: dict[str, Any], metric: str) -> tuple[float, float, float]:
    """(estimate, low, high) of one comparison: a difference, or a win rate."""
    return (c["value"] if _is_rate(metric) else c["diff"]), c["low"], c["high"]


def _panel(ax: Any, metric: str, pairs: list[tuple[str, dict[str, Any]]], lower: bool) -> str:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    zero = _zero(metric)
    ys = list(range(len(pairs)))[::-1]  # the first pair on top, as in the table
    ends = [zero]
    for y, (_, c) in zip(ys, pairs):
        value, low, high = _point(c, metric)
        worse = (low > zero) if lower else (high < zero)
        color = BETTER if c["better"] else WORSE if worse else UNCLEAR
        ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color=color, ecolor=color,
                    elinewidth=2.5, capsize=4, markersize=6)
        # the figure itself at the panel's edge: a difference too small for the axis is still read
        ax.annotate(f"{value:.2f}" if _is_rate(metric) else f"{value:+.3g}" if value else "0", (1.02, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize=7, color=color)
        ends += [low, high]
    span = max(abs(e - zero) for e in ends) or 1.0
    left, right = zero - 1.15 * span, zero + 1.15 * span
    ax.set_xlim(left, right)
    ax.set_ylim(-0.7, len(pairs) - 0.3)
    better_left = lower and not _is_rate(metric)
    ax.axvspan(left if better_left else zero, zero if better_left else right, color=BETTER, alpha=0.07, lw=0)
    ax.axvline(zero, color="black", linewidth=1)
    ax.set_xlabel("← better" if better_left else "better →", fontsize=8, color=BETTER,
                  loc="left" if better_left else "right")
    ax.set_yticks(ys, [label for label, _ in pairs], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    scorer = metric.removesuffix(WIN_RATE)
    what = (f"{metric}: share of prompts whose answer the {scorer} prefers" if _is_rate(metric)
            else "perplexity: difference in log perplexity" if metric == "perplexity" else f"{metric}: difference")
    title = what + (" (lower is better)" if lower else "")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return title
