"""The champion gate's rule on per-item scores: each way it must refuse, and when it promotes."""

from __future__ import annotations

import pytest

from flows.gate import Bootstrap, GateConfig, decide

BOOT = Bootstrap(iters=1000, level=0.95, seed=0)


def config(**changes: object) -> GateConfig:
    base = {"primary": {"metric": "reward_score", "margin": 0.05},
            "guards": {"instruction_loss": 0.2}, "floors": {"instruction_loss": 3.0}}
    return GateConfig.model_validate({**base, **changes})


def items(values: list[float]) -> dict[str, float]:
    return {f"q{i}": v for i, v in enumerate(values)}


CHAMPION = {"reward_score": items([0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.4, 0.1] * 4),
            "instruction_loss": items([2.0, 2.5, 1.8, 2.2] * 4)}


def challenger(reward_shift: float = 0.0, loss_shift: float = 0.0, noise: float = 0.0) -> dict:
    rewards = {k: v + reward_shift + (noise if i % 2 else -noise)
               for i, (k, v) in enumerate(CHAMPION["reward_score"].items())}
    losses = {k: v + loss_shift for k, v in CHAMPION["instruction_loss"].items()}
    return {"reward_score": rewards, "instruction_loss": losses}


def row(found: dict) -> dict[str, float]:
    return {m: sum(v.values()) / len(v) for m, v in found.items()}


def test_a_challenger_better_by_the_margin_beyond_the_interval_is_promoted() -> None:
    found = challenger(reward_shift=0.2, loss_shift=-0.05)
    decision = decide(config(), BOOT, found, row(found), CHAMPION)
    assert decision.promote, decision.reason
    primary = decision.checks[0]
    assert primary.role == "primary" and primary.improvement == pytest.approx(0.2)
    assert primary.low > 0 and primary.n == 32
    # a lower-is-better guard that went down improved
    guard = next(c for c in decision.checks if c.role == "guard")
    assert guard.improvement == pytest.approx(0.05) and guard.passed


def test_better_by_less_than_the_margin_is_refused_even_when_certain() -> None:
    found = challenger(reward_shift=0.03)  # every item up by 0.03: interval far from zero
    decision = decide(config(), BOOT, found, row(found), CHAMPION)
    assert not decision.promote
    assert "less than the margin" in decision.checks[0].reason and decision.checks[0].low > 0


def test_better_on_average_but_within_the_noise_is_refused() -> None:
    found = challenger(reward_shift=0.06, noise=0.6)  # half the items far up, half far down
    decision = decide(config(), BOOT, found, row(found), CHAMPION)
    assert not decision.promote
    assert "reaches zero" in decision.reason and decision.checks[0].low <= 0 < decision.checks[0].improvement


def test_a_guard_that_regresses_beyond_its_tolerance_refuses_a_winner() -> None:
    found = challenger(reward_shift=0.3, loss_shift=0.25)  # instruction loss worse by 0.25 > 0.2
    decision = decide(config(), BOOT, found, row(found), CHAMPION)
    assert not decision.promote and decision.checks[0].passed
    assert "instruction_loss worsens by 0.25" in decision.reason
    within = challenger(reward_shift=0.3, loss_shift=0.15)
    assert decide(config(), BOOT, within, row(within), CHAMPION).promote


def test_a_missing_metric_fails_the_gate_and_names_it() -> None:
    found = challenger(reward_shift=0.3)
    del found["instruction_loss"]
    decision = decide(config(floors={}), BOOT, found, row(found), CHAMPION)
    assert not decision.promote and "instruction_loss is missing for the challenger" in decision.reason
    primary_missing = decide(config(primary={"metric": "hhh_alignment", "margin": 0.0}, floors={}),
                             BOOT, challenger(0.3), row(challenger(0.3)), CHAMPION)
    assert not primary_missing.promote and "hhh_alignment is missing" in primary_missing.reason


def test_with_no_champion_the_floors_decide() -> None:
    good = challenger()
    assert decide(config(), BOOT, good, row(good), None).promote
    bad = challenger(loss_shift=1.5)  # mean loss 3.625 > the floor 3.0 (lower is better: at most)
    decision = decide(config(), BOOT, bad, row(bad), None)
    assert not decision.promote and "at most 3" in decision.reason


def test_a_negative_tolerance_is_refused_in_params() -> None:
    with pytest.raises(ValueError, match="guard|tolerance"):
        config(guards={"perplexity": -0.1})
