"""The paired comparison evaluate reports and the champion gate decides with: it finds the difference
a trained model makes over the same items, and none between two copies of one model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from stages.common.config import Paths
from stages.common.stats import compare, mean_stderr, paired_bootstrap, win_rate
from tests.conftest import tiny_config


def test_mean_stderr_is_the_sample_standard_deviation_over_root_n() -> None:
    mean, se = mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)
    assert math.isnan(mean_stderr([3.0])[1])


def test_pairing_finds_a_small_consistent_gain_that_unpaired_error_bars_would_hide() -> None:
    """Items of very different difficulty, each a little better for b: the error bars of the two
    means overlap widely, the paired interval excludes zero."""
    a = [float(i) for i in range(40)]
    b = [x + 0.1 + 0.01 * (i % 3) for i, x in enumerate(a)]
    c = paired_bootstrap(a, b, iters=2000, seed=0)
    assert c.diff == pytest.approx(0.11, abs=0.005) and 0 < c.low <= c.diff <= c.high and c.significant
    assert mean_stderr(a)[1] > 10 * c.diff  # unpaired, the gain is lost in the items' spread


def test_no_difference_and_noise_are_not_significant() -> None:
    same = paired_bootstrap([0.2, 0.4, 0.9], [0.2, 0.4, 0.9], iters=500, seed=0)
    assert (same.diff, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    coin = [1.0, 0.0] * 10
    noise = paired_bootstrap(coin, coin[1:] + coin[:1], iters=2000, seed=0)
    assert noise.low < 0 < noise.high and not noise.significant


def test_compare_pairs_items_by_id_and_refuses_no_common_item() -> None:
    c = compare({"x": 1.0, "y": 2.0, "only_a": 9.0}, {"y": 3.0, "x": 2.0, "only_b": -9.0}, iters=200, seed=0)
    assert c.n == 2 and c.diff == 1.0
    with pytest.raises(ValueError, match="no items in common"):
        compare({"x": 1.0}, {"y": 1.0}, iters=200, seed=0)


def test_win_rate_counts_ties_half_and_needs_its_interval_above_one_half() -> None:
    always = win_rate({str(i): 0.0 for i in range(20)}, {str(i): 1.0 for i in range(20)}, iters=500, seed=0)
    assert (always["value"], always["low"], always["n"], always["better"]) == (1.0, 1.0, 20, True)
    ties = win_rate({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, iters=500, seed=0)
    assert ties["value"] == 0.5 and not ties["better"]


def test_a_trained_tiny_model_differs_from_the_untrained_one_and_a_copy_does_not(
        tiny_workdir: Paths, tmp_path: Path) -> None:
    """Held-out block losses (evaluate's perplexity items) of the random-init base, the base after
    the tiny profile's pretraining, and a byte copy of the base."""
    from stages.common.lm import block_losses, load_causal_lm, val_blocks
    from stages.common.training import TrainConfig
    from stages.pretrain import run

    run(tiny_config("pretrain"), tiny_workdir, tiny_config("train", TrainConfig, checkpoints=str(tmp_path / "ck")))
    copy = shutil.copytree(tiny_workdir.base, tmp_path / "copy")
    blocks = val_blocks(tiny_workdir.tokenized, 16)
    losses = {name: dict(enumerate(block_losses(load_causal_lm(folder), blocks)))
              for name, folder in (("base", tiny_workdir.base), ("trained", tiny_workdir.pretrain), ("copy", copy))}
    trained = compare(losses["base"], losses["trained"], iters=2000, seed=0)
    assert trained.n == len(blocks) and trained.high < 0  # lower loss on the same blocks, beyond the interval
    copied = compare(losses["base"], losses["copy"], iters=2000, seed=0)
    assert copied.diff == 0.0 and not copied.significant
