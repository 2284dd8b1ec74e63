"""The evaluation chart: what a team decides on, each model against the one before it."""

from __future__ import annotations

from pathlib import Path

from stages.common.tables import comparison_chart


def diff(value: float, low: float, high: float, better: bool) -> dict:
    return {"diff": value, "low": low, "high": high, "n": 8, "level": 0.95, "significant": low > 0 or high < 0,
            "better": better}


SAME = diff(0.0, 0.0, 0.0, False)  # every item scored the same by both models: nothing to show


def test_a_panel_per_metric_that_moved_in_a_grid(tmp_path: Path) -> None:
    import matplotlib.image

    comparisons = {
        "sft": {"against": "pretrain", "perplexity": diff(-0.12, -0.13, -0.10, True),
                "judge_score": diff(0.01, -0.02, 0.04, False), "judge_win_rate": {"value": 0.7, "low": 0.55,
                                                                                  "high": 0.85, "n": 8, "better": True},
                "arithmetic": SAME, "humaneval": SAME},
        "ppo": {"against": "sft", "perplexity": diff(0.05, 0.01, 0.09, False), "judge_score": SAME,
                "arithmetic": SAME, "humaneval": SAME},
        "judge": {"against": "chance", "pairwise_accuracy": diff(0.2, 0.05, 0.35, True)},
    }
    out = tmp_path / "chart.png"
    titles = comparison_chart(comparisons, ["perplexity", "judge_score", "arithmetic", "humaneval",
                                            "pairwise_accuracy"], out, lower_is_better=["perplexity"])
    # metrics in the table's order, the win rate beside judge_score; arithmetic and humaneval,
    # where no model differs from the one before on any item, have no panel
    assert titles == ["perplexity: difference in log perplexity (lower is better)", "judge_score: difference",
                      "judge_win_rate: share of prompts whose answer the judge prefers",
                      "pairwise_accuracy: difference"]
    height, width, _ = matplotlib.image.imread(out).shape
    assert width <= 1400 and height > 400  # a grid: three columns, two rows (not one long row)


def test_one_model_draws_a_chart_that_says_there_is_nothing_to_compare(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    assert comparison_chart({}, ["perplexity"], out) == []
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # DVC's plot of the stage is still there


def test_the_prefect_artifact_holds_the_table_and_the_same_chart(tmp_path: Path) -> None:
    import base64
    import re

    from stages.common.tables import with_chart

    (tmp_path / "table.md").write_text("| model | perplexity |\n| --- | --- |\n| sft | 9.5 ± 0.2 |\n")
    comparison_chart({"sft": {"against": "pretrain", "perplexity": diff(-0.1, -0.2, -0.05, True)}}, ["perplexity"],
                     tmp_path / "chart.png")
    shown = with_chart(tmp_path / "table.md", tmp_path / "chart.png")
    assert shown.endswith((tmp_path / "table.md").read_text())  # the chart first: what a person reads first
    (inline,) = re.findall(r"!\[chart.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", shown)
    assert base64.b64decode(inline) == (tmp_path / "chart.png").read_bytes()
