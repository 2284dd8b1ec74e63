"""ppo: PPO, RLOO and GRPO on tiny models, curves and samples, resume after SIGKILL, bad input.

The SFT and reward models are built here from the tiny inputs (the random-init base with the
tiny tokenizer as the SFT policy; a sequence classifier of the same shape as the reward model),
so these tests do not depend on the sft and reward stages.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stages
from stages.common.config import Paths, StageError
from stages.common.io import read_records, write_records
from stages.common.training import TrainConfig
from stages.ppo import PpoConfig, build_prompts, prompt_messages, rollout_order, run, split_heldout
from tests.conftest import tiny_model

ROOT = Path(stages.__file__).resolve().parent.parent  # the project, for the subprocess's imports
# A couple of short updates: tiny models, short responses, prompts that fit the 256-token context.
TINY = dict(updates=2, batch_size=2, num_generations=2, response_length=8, max_prompt_length=160,
            eval_prompts=3, save_steps=1, learning_rate=1e-4)


def build_rl_inputs(paths: Paths) -> None:
    """models/sft (tiny base + tiny tokenizer) and models/reward (same shape, one-output head)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tiny_model(paths, paths.sft)
    tok = AutoTokenizer.from_pretrained(paths.sft)
    config = AutoConfig.from_pretrained(paths.base, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(paths.reward)
    tok.save_pretrained(paths.reward)


@pytest.fixture
def rl_paths(tiny_workdir: Paths) -> Paths:
    build_rl_inputs(tiny_workdir)
    return tiny_workdir


def train_config(paths: Paths) -> TrainConfig:
    return TrainConfig(checkpoints=paths.reports.parent / "checkpoints")


def read_curve(paths: Paths) -> list[dict[str, str]]:
    with (paths.report_dir("ppo") / "curves.csv").open() as f:
        return list(csv.DictReader(f))


def read_samples(paths: Paths) -> list[dict]:
    return [json.loads(line) for line in (paths.report_dir("ppo") / "samples.jsonl").read_text().splitlines()]


def assert_policy_generates(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (folder / "llm_forge.yaml").exists() and (folder / "metrics.json").exists()


# --- helpers on inline data ----------------------------------------------------------------------


def test_prompt_is_the_conversation_up_to_its_last_user_turn() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    assert [m["content"] for m in prompt_messages(msgs)] == ["s", "a", "b", "c"]
    assert prompt_messages([{"role": "assistant", "content": "x"}]) is None


def test_prompts_are_deduplicated_length_checked_and_split_stably(rl_paths: Paths) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rl_paths.sft)
    records = read_records(rl_paths.dedup, "instructions")
    prompts, dropped = build_prompts(records, tok, 160)
    assert len(prompts) + sum(dropped.values()) == len(records)
    assert dropped["too_long"] > 0 and all(len(p.ids) <= 160 for p in prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    train, held = split_heldout(prompts, 3, "salt")
    assert len(held) == 3 and not {p.text for p in held} & {p.text for p in train}
    # the held-out choice does not move when other prompts go
    assert [p.text for p in split_heldout([p for p in prompts if p not in train[:5]], 3, "salt")[1]] == \
        [p.text for p in held]
    order = rollout_order(5, 12, seed=0)
    assert sorted(order[:5]) == list(range(5)) and order == rollout_order(5, 12, seed=0)


# --- the three algorithms ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_algorithm_trains_and_writes_a_policy(rl_paths: Paths, algorithm: str) -> None:
    m = run(PpoConfig(algorithm=algorithm, **TINY), rl_paths, train_config(rl_paths))
    assert m["algorithm"] == algorithm and m["resumed_from_step"] == 0
    assert m["prompts_in"] == m["prompts_train"] + m["prompts_heldout"] + sum(m["prompts_dropped"].values())
    assert m["prompts_dropped"]["too_long"] > 0  # tiny xsum articles do not fit the 256-token context
    assert isinstance(m["reward_before"], float) and isinstance(m["reward_after"], float)
    assert_policy_generates(rl_paths.ppo)

    curve = read_curve(rl_paths)
    assert [int(r["step"]) for r in curve] == [1, 2]
    expected = {"kl", "reward", "policy_loss", "entropy"} | ({"value_loss"} if algorithm == "ppo" else set())
    assert expected <= set(curve[0]) and all(curve[-1][k] != "" for k in expected)

    rows = read_samples(rl_paths)
    assert [r["when"] for r in rows] == ["before"] * 3 + ["after"] * 3
    assert [r["id"] for r in rows[:3]] == [r["id"] for r in rows[3:]]
    assert all(isinstance(r["reward"], float) and isinstance(r["response"], str) for r in rows)
    assert not (rl_paths.reports.parent / "checkpoints" / "ppo").exists()  # removed after success


# --- resume --------------------------------------------------------------------------------------

# Runs the stage's CLI and SIGKILLs the process as soon as its first complete checkpoint exists:
# our PPO checkpoint once it is marked COMPLETE, the HF Trainer's (RLOO/GRPO) once it is written.
KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
import stages.common.training as training
import transformers

def killing(original):
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

training.Checkpoints.mark_complete = killing(training.Checkpoints.mark_complete)
transformers.Trainer._save_checkpoint = killing(transformers.Trainer._save_checkpoint)
from stages.ppo import main
sys.exit(main(sys.argv[1:]))
"""


def write_params(paths: Paths, ppo: dict, folder: Path) -> Path:
    params = {"paths": {k: str(v) for k, v in paths.model_dump().items()},
              "train": {"checkpoints": str(paths.reports.parent / "checkpoints")}, "ppo": ppo}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def policy_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_killed_run_resumes_from_its_last_checkpoint(rl_paths: Paths, tmp_path: Path, algorithm: str) -> None:
    from stages.ppo import main

    ppo = {**TINY, "algorithm": algorithm, "updates": 3, "save_steps": 1}
    params = write_params(rl_paths, ppo, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, "--params", str(params),
                             "--no-mlflow"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = rl_paths.reports.parent / "checkpoints" / "ppo"
    assert (checkpoints / "checkpoint-1").is_dir() and not rl_paths.ppo.exists()

    assert main(["--params", str(params), "--no-mlflow"]) == 0
    metrics = json.loads((rl_paths.report_dir("ppo") / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 1
    assert [int(r["step"]) for r in read_curve(rl_paths)] == [1, 2, 3]  # the killed run's point is kept
    assert_policy_generates(rl_paths.ppo)
    assert not checkpoints.exists()
    if algorithm == "ppo":  # same data, RNG and optimizer state: the same policy as an unbroken run
        resumed = policy_weights(rl_paths.ppo)
        shutil.rmtree(rl_paths.ppo)
        run(PpoConfig(**ppo), rl_paths, train_config(rl_paths))
        unbroken = policy_weights(rl_paths.ppo)
        assert all((resumed[k] - unbroken[k]).abs().max() < 1e-5 for k in unbroken)


# --- a reward model with its own vocabulary --------------------------------------------------------


def build_bert_reward(paths: Paths) -> None:
    """A tiny BERT-style reward model with a WordPiece vocabulary of its own and no chat template
    (like a MiniLM reward model), in place of models/reward."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    texts = [m["content"] for r in read_records(paths.dedup, "instructions") for m in r["messages"]]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", model_max_length=64)
    config = BertConfig(vocab_size=len(wrapped), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    shutil.rmtree(paths.reward, ignore_errors=True)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(paths.reward)
    wrapped.save_pretrained(paths.reward)


def test_ppo_reads_a_reward_model_of_another_vocabulary_through_text(rl_paths: Paths) -> None:
    build_bert_reward(rl_paths)
    m = run(PpoConfig(algorithm="ppo", **TINY), rl_paths, train_config(rl_paths))
    assert m["reward_input"] == "text"  # decoded, re-encoded (and cut to its 64 positions) for the reward model
    assert read_curve(rl_paths)[-1]["reward"] != ""
    assert_policy_generates(rl_paths.ppo)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_models_are_named(rl_paths: Paths) -> None:
    shutil.rmtree(rl_paths.reward)
    with pytest.raises(StageError, match=f"reward model {rl_paths.reward} does not exist"):
        run(PpoConfig(**TINY), rl_paths, train_config(rl_paths))
    shutil.rmtree(rl_paths.sft)
    with pytest.raises(StageError, match=f"sft model {rl_paths.sft} does not exist"):
        run(PpoConfig(**TINY), rl_paths, train_config(rl_paths))


def test_missing_empty_or_too_long_prompts_are_named(rl_paths: Paths) -> None:
    prompts = rl_paths.dedup / "instructions.parquet"
    with pytest.raises(StageError, match="no usable prompt.*too_long"):
        run(PpoConfig(**{**TINY, "max_prompt_length": 8}), rl_paths, train_config(rl_paths))
    write_records(rl_paths.dedup, "instructions", [])
    with pytest.raises(StageError, match=f"{prompts} holds no usable prompt \\(0 records"):
        run(PpoConfig(**TINY), rl_paths, train_config(rl_paths))
    prompts.unlink()
    with pytest.raises(StageError, match=f"prompt file {prompts} does not exist"):
        run(PpoConfig(**TINY), rl_paths, train_config(rl_paths))


def test_cli_reports_bad_input_in_one_line(rl_paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages.ppo import main

    shutil.rmtree(rl_paths.sft)
    assert main(["--params", str(write_params(rl_paths, TINY, tmp_path)), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(rl_paths.sft) in err[0]


def test_reward_model_reads_text_as_the_reward_stage_trained_it(rl_paths: Paths) -> None:
    """Both formats (chat template; plain prompt + answer + EOS) give the ids stages.reward trains on."""
    reward = pytest.importorskip("stages.reward")
    from transformers import AutoTokenizer

    from stages.ppo import reward_text

    build_bert_reward(rl_paths)
    for tok in (AutoTokenizer.from_pretrained(rl_paths.sft), AutoTokenizer.from_pretrained(rl_paths.reward)):
        text, special = reward_text(tok, [{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.")
        assert tok(text, add_special_tokens=special)["input_ids"] == \
            reward.encode(tok, "Why is the sky blue?", "Rayleigh scattering.")
