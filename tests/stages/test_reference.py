"""reference: the sft model's log-probs of the policy part's answers, equal to what TRL computes
itself; only the policy part is read; bad pairs are counted; a cap keeps a stable subset.

The sft model is the tiny random-init base with the tiny tokenizer (`tiny_model`): the test is
about which tokens are scored and how, not about a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages import reference
from stages.common.config import Paths, StageError
from stages.common.io import write_records
from stages.common.policy_pairs import model_hash, read_scored
from tests.conftest import run_in, tiny_config, tiny_model

TOPICS = ["the river", "a red car", "the old town", "green tea", "the winter", "a small dog", "the market",
          "bread", "the library", "music", "the sea", "a bicycle"]


def toy_pairs(n: int, part: str = "policy", start: int = 0) -> list[dict[str, str]]:
    """Preference pairs that one word separates: the chosen answer is polite, the rejected one
    rude, about the same topic; `part` is the `split` they belong to."""
    out = []
    for i in range(start, start + n):
        topic = TOPICS[i % len(TOPICS)]
        out.append({"id": f"toy/{i}", "source": "toy", "prompt": f"Tell me about {topic} ({i}).",
                    "chosen": f"Thanks for asking! {topic.capitalize()} is nice.",
                    "rejected": f"Whatever. {topic.capitalize()} is nice.", "split": part})
    return out


def bad_pairs() -> list[dict[str, str]]:
    pair = {"source": "bad", "prompt": "Which is better?", "split": "policy"}
    return [{**pair, "id": "bad/same", "chosen": "Same.", "rejected": "Same."},
            {**pair, "id": "bad/same-space", "chosen": "Same. ", "rejected": "Same."},
            {**pair, "id": "bad/empty", "chosen": "Fine.", "rejected": ""},
            {**pair, "id": "bad/missing", "chosen": None, "rejected": "Fine."},
            {**pair, "id": "bad/long", "chosen": "word " * 300, "rejected": "no"}]


@pytest.fixture
def pref_paths(tiny_workdir: Paths) -> Paths:
    """models/sft (tiny base + tokenizer) and a preference set: policy pairs, other parts, bad pairs."""
    tiny_model(tiny_workdir, tiny_workdir.sft)
    records = (toy_pairs(40) + toy_pairs(6, "reward", 100) + toy_pairs(5, "judge", 200) + toy_pairs(4, "test", 300)
               + bad_pairs())
    write_records(tiny_workdir.dedup, "preferences", records)
    return tiny_workdir


def trl_reference_logps(paths: Paths, pairs: list[dict]) -> dict[str, tuple[float, float]]:
    """What TRL's DPOTrainer computes itself with `precompute_ref_log_probs` on the same pairs
    (the sft model as the policy, so the reference is the sft model): id -> (chosen, rejected)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from stages.common.lm import load_chat_tokenizer
    from stages.common.preferences import pair_messages

    tok = load_chat_tokenizer(paths.sft, "the pairs are rendered with it")
    model = AutoModelForCausalLM.from_pretrained(paths.sft, dtype=torch.float32)
    data = datasets.Dataset.from_list([{"id": p["id"], **pair_messages(p["prompt"], p["chosen"], p["rejected"])}
                                       for p in pairs])
    args = DPOConfig(output_dir=str(paths.reports / "trl"), precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=3, report_to="none", remove_unused_columns=False, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    done = trainer.train_dataset
    return {i: (c, r) for i, c, r in zip(done["id"], done["ref_chosen_logps"], done["ref_rejected_logps"])}


def trl_kto_reference_logps(paths: Paths, pairs: list[dict]) -> dict[tuple[str, bool], float]:
    """What TRL's KTOTrainer computes itself (`ref_logps`) on the pairs unpaired: (id, desirable) -> log-prob."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from stages.common.lm import load_chat_tokenizer
    from stages.common.preferences import pair_messages

    tok = load_chat_tokenizer(paths.sft, "the pairs are rendered with it")
    model = AutoModelForCausalLM.from_pretrained(paths.sft, dtype=torch.float32)
    data = datasets.Dataset.from_list([
        {"id": p["id"], "prompt": m["prompt"], "completion": m[side], "label": side == "chosen"}
        for p in pairs for m in [pair_messages(p["prompt"], p["chosen"], p["rejected"])]
        for side in ("chosen", "rejected")])
    args = KTOConfig(output_dir=str(paths.reports / "trl"), precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=4, report_to="none", remove_unused_columns=False, bf16=False,
                     train_sampling_strategy="sequential")
    done = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train_dataset
    return {(i, label): logp for i, label, logp in zip(done["id"], done["label"], done["ref_logps"])}


def test_cached_log_probs_are_what_trl_computes(pref_paths: Paths) -> None:
    m = reference.run(tiny_config("reference", max_pairs=None), pref_paths)
    pairs, meta = read_scored(pref_paths.reference)
    assert meta["sft_md5"] == model_hash(pref_paths.sft) and meta["pairs"] == len(pairs) == 40
    trl = trl_reference_logps(pref_paths, pairs)
    assert set(trl) == {p["id"] for p in pairs}
    for p in pairs:
        assert p["ref_chosen_logps"] == pytest.approx(trl[p["id"]][0], abs=1e-4)
        assert p["ref_rejected_logps"] == pytest.approx(trl[p["id"]][1], abs=1e-4)
        assert p["ref_chosen_logps"] < 0 and p["ref_chosen_logps"] != p["ref_rejected_logps"]
    assert m["mean_chosen_logp"] == pytest.approx(sum(p["ref_chosen_logps"] for p in pairs) / 40, abs=1e-3)
    kto = trl_kto_reference_logps(pref_paths, pairs)  # KTO reads the same values as its `ref_logps`
    for p in pairs:
        assert p["ref_chosen_logps"] == pytest.approx(kto[p["id"], True], abs=1e-4)
        assert p["ref_rejected_logps"] == pytest.approx(kto[p["id"], False], abs=1e-4)


def test_only_the_policy_part_and_every_skipped_pair_counted(pref_paths: Paths) -> None:
    m = reference.run(tiny_config("reference", max_pairs=None, max_length=64), pref_paths)
    assert m["records"] == 60 and m["parts"] == {"judge": 5, "policy": 45, "reward": 6, "test": 4}
    assert m["docs_in"] == 45 and m["docs_out"] == 40
    assert m["dropped"] == {"empty_answer": 2, "identical_pair": 2, "too_long": 1}
    assert m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    pairs, _ = read_scored(pref_paths.reference)
    assert {p["id"] for p in pairs} == {f"toy/{i}" for i in range(40)}  # no other part's pair
    assert all(p["prompt_tokens"] + max(p["chosen_tokens"], p["rejected_tokens"]) <= 64 for p in pairs)
    assert json.loads((pref_paths.reference / "reference.json").read_text())["pairs"] == 40


def test_a_cap_keeps_a_stable_subset(pref_paths: Paths) -> None:
    m = reference.run(tiny_config("reference", max_pairs=10), pref_paths)
    assert m["docs_out"] == 10 and m["dropped"]["beyond_max_pairs"] == 30
    first = {p["id"] for p in read_scored(pref_paths.reference)[0]}
    # other pairs arriving do not reshuffle which ones are kept: the newcomers only take a place by their hash
    newcomers = [{**r, "id": f"new/{r['id']}"} for r in toy_pairs(20)]
    write_records(pref_paths.dedup, "preferences", toy_pairs(40) + newcomers)
    reference.run(tiny_config("reference", max_pairs=10), pref_paths)
    again = {p["id"] for p in read_scored(pref_paths.reference)[0]}
    new = {i for i in again if i.startswith("new/")}
    assert again - new <= first and len(first - again) == len(new)


def test_no_usable_policy_pair_is_an_error(pref_paths: Paths) -> None:
    write_records(pref_paths.dedup, "preferences", toy_pairs(4, "reward") + bad_pairs()[:1])
    with pytest.raises(StageError, match=r"dedup/preferences has no usable pair in its policy part .*'reward': 4"):
        reference.run(tiny_config("reference"), pref_paths)
    write_records(pref_paths.dedup, "preferences", [{k: v for k, v in r.items() if k != "split"}
                                                    for r in toy_pairs(4)])  # pairs of no part train nothing
    with pytest.raises(StageError, match=r"no usable pair in its policy part .*'None': 4"):
        reference.run(tiny_config("reference"), pref_paths)


def test_a_beta_only_experiment_leaves_the_reference_pass_cached(tiny_project: Path) -> None:
    """In the tiny pipeline DVC ran, another dpo.beta makes dpo stale and not the reference stage."""
    params_file = tiny_project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["dpo"]["beta"] = params["dpo"]["beta"] * 2
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        stale = json.loads(run_in(tiny_project, "-m", "dvc", "status", "--json").stdout)
    finally:
        params_file.write_text(original)
    assert "dpo" in stale and "reference" not in stale, stale
