"""The champion gate's rule on per-item scores: each way it must refuse, and when it promotes; a
judge no better than chance decides nothing; a model like the demo's RLOO model (the proxy's reward
up, held-out instruction loss +0.26) does not replace the champion under the demo's own gate."""

from __future__ import annotations

import random

import pytest

from flows.gate import Bootstrap, GateConfig, decide
from stages.common.config import load_section, read_yaml
from tests.conftest import ROOT

BOOT = Bootstrap(iters=1000, level=0.95, seed=0)


def config(**changes: object) -> GateConfig:
    base = {"primary": {"metric": "truthful_qa_mc", "margin": 0.05},
            "guards": {"instruction_loss": 0.2}, "floors": {"instruction_loss": 3.0}}
    return GateConfig.model_validate({**base, **changes})


def accuracy(right: int, n: int) -> dict[str, float]:
    """A scorer's per-pair correctness on n test pairs, `right` of them right."""
    return {f"pair{i}": float(i < right) for i in range(n)}


def items(values: list[float]) -> dict[str, float]:
    return {f"q{i}": v for i, v in enumerate(values)}


CHAMPION = {"truthful_qa_mc": items([0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.4, 0.1] * 4),
            "instruction_loss": items([2.0, 2.5, 1.8, 2.2] * 4)}


def challenger(reward_shift: float = 0.0, loss_shift: float = 0.0, noise: float = 0.0) -> dict:
    rewards = {k: v + reward_shift + (noise if i % 2 else -noise)
               for i, (k, v) in enumerate(CHAMPION["truthful_qa_mc"].items())}
    losses = {k: v + loss_shift for k, v in CHAMPION["instruction_loss"].items()}
    return {"truthful_qa_mc": rewards, "instruction_loss": losses}


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


def test_a_guard_fails_only_when_its_whole_interval_is_worse_than_the_tolerance() -> None:
    """Worse on average by more than the tolerance, but within the items' noise: no proof the price
    was exceeded, the guard holds; the same mean worsening on steady items fails it."""
    rng = random.Random(0)
    noisy = {k: v + 0.25 + rng.choice((-1.0, 1.0)) for k, v in CHAMPION["instruction_loss"].items()}
    found = {**challenger(reward_shift=0.3), "instruction_loss": noisy}
    decision = decide(config(floors={}), BOOT, found, row(found), CHAMPION)
    guard = next(c for c in decision.checks if c.role == "guard")
    assert guard.passed and guard.improvement < -0.2 and guard.high > -0.2, guard
    steady = {**challenger(reward_shift=0.3, loss_shift=0.25)}
    assert not decide(config(floors={}), BOOT, steady, row(steady), CHAMPION).promote


def test_a_judge_no_better_than_chance_cannot_decide() -> None:
    """The primary metric is the judge's score: with the judge at 0.55 on 40 test pairs (interval
    reaching 0.5) the gate does not decide and the champion stays, whatever the scores say; at 0.8 it
    decides; without the judge's accuracy it does not."""
    judged = {"judge_score": CHAMPION["truthful_qa_mc"], "instruction_loss": CHAMPION["instruction_loss"]}
    found = {"judge_score": challenger(reward_shift=0.3)["truthful_qa_mc"], "instruction_loss":
             CHAMPION["instruction_loss"]}
    cfg = config(primary={"metric": "judge_score", "margin": 0.05})
    weak = decide(cfg, BOOT, found, row(found), judged, {"judge": accuracy(22, 40)})
    assert not weak.promote and not weak.decided
    assert weak.reason.startswith("cannot decide, kept the champion: the judge's pairwise accuracy 0.550")
    assert "does not clear chance" in weak.reason and weak.checks[0].role == "scorer" and weak.checks[0].low <= 0.5
    assert weak.as_dict()["decided"] is False
    strong = decide(cfg, BOOT, found, row(found), judged, {"judge": accuracy(32, 40)})
    assert strong.promote and strong.decided and strong.checks[0].passed, strong.reason
    missing = decide(cfg, BOOT, found, row(found), judged, {"proxy": accuracy(40, 40)})
    assert not missing.decided and "the judge's pairwise accuracy is missing" in missing.reason
    # a gate that does not score with the judge needs none
    assert decide(config(), BOOT, challenger(0.3), row(challenger(0.3)), CHAMPION).decided


def test_the_demo_gate_keeps_the_champion_against_a_model_that_chased_its_proxy() -> None:
    """The demo's RLOO model of issue 20, as the candidate against its sft model as the champion: the
    proxy's reward up +0.37 (what it optimized), the judge's score flat, held-out instruction loss
    +0.26 [+0.20, +0.32] and perplexity +5% on every block. The demo's gate (params.yaml) refuses it,
    on the judge and on both guards; promoting it on the proxy's reward would have taken a gate that
    trusts what the policy was optimized against."""
    cfg = load_section(GateConfig, "gate", read_yaml(ROOT / "params.yaml")["retrain"])
    assert cfg.primary.metric == "judge_score"
    rng = random.Random(1)
    prompts, answers, blocks = 64, 8, 4
    champion = {"judge_score": {f"p{i}": rng.gauss(0.0, 1.0) for i in range(prompts)},
                "proxy_reward": {f"p{i}": rng.gauss(0.0, 1.0) for i in range(prompts)},
                "instruction_loss": {f"i{i}": 2.4 + rng.gauss(0.0, 0.4) for i in range(answers)},
                "perplexity": {f"b{i}": 2.64 + rng.gauss(0.0, 0.05) for i in range(blocks)}}
    candidate = {"judge_score": {k: v + rng.gauss(0.0, 0.5) for k, v in champion["judge_score"].items()},
                 "proxy_reward": {k: v + 0.37 + rng.gauss(0.0, 0.5) for k, v in champion["proxy_reward"].items()},
                 "instruction_loss": {k: v + d for (k, v), d in zip(champion["instruction_loss"].items(),
                                                                     (0.20, 0.32, 0.22, 0.30, 0.24, 0.28, 0.26, 0.26))},
                 "perplexity": {k: v + 0.052 for k, v in champion["perplexity"].items()}}
    values = {**row(candidate), "perplexity": 14.8}
    decision = decide(cfg, BOOT, candidate, values, champion, {"judge": accuracy(150, 200)})
    assert decision.decided and not decision.promote, decision.reason
    failed = {c.metric for c in decision.checks if not c.passed}
    assert {"judge_score", "instruction_loss", "perplexity"} <= failed, decision.reason
    loss = next(c for c in decision.checks if c.metric == "instruction_loss" and c.role == "guard")
    assert 0.19 < -loss.high and -loss.low < 0.35  # the interval of the worsening, as the issue measured it
    # the rule the demo had (the policy's own reward model as the primary metric, instruction loss
    # judged on its mean with a tolerance of 0.3) would have promoted it
    old = GateConfig.model_validate({"primary": {"metric": "proxy_reward", "margin": 0.05},
                                     "guards": {"perplexity": 0.1, "instruction_loss": 0.3}, "floors": {}})
    assert decide(old, BOOT, candidate, values, champion, {"proxy": accuracy(150, 200)}).promote
