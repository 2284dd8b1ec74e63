"""ppo: PPO, RLOO and GRPO each raise the reward of a toy reward model, LoRA, resume after
SIGKILL, a reward model of another vocabulary, bad input.

The SFT and reward models are built here from the tiny inputs, so these tests do not depend on the
sft and reward stages: the SFT policy is the random-init tiny base with the tiny tokenizer; the
reward model is a real one-layer Llama sequence classifier whose weights are set by hand so that
it scores the share of "paid" tokens in what it reads (`build_token_reward`).
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
from stages.common.rl import build_prompts, prompt_messages, rollout_order, split_heldout
from stages.common.training import TrainConfig
from stages.ppo import run
from tests.conftest import tiny_config, tiny_model, tiny_params

ROOT = Path(stages.__file__).resolve().parent.parent  # the project, for the subprocess's imports
# Enough updates, at a high learning rate, for a random-init policy to learn the paid tokens.
LEARN = dict(updates=20, learning_rate=0.02, batch_size=4, num_generations=4, eval_prompts=6, save_steps=20)


def paid_tokens(tok: object, prompt_ids: set[int]) -> list[int]:
    """The tokens the toy reward model pays for: whole words (a leading-space token that decodes
    and re-encodes to itself, so text-reading RLOO/GRPO see them too) that no usable prompt holds,
    so a response earns all of its reward itself."""
    return [i for t, i in tok.get_vocab().items() if t.startswith("\u0120") and len(t) > 1 and i not in prompt_ids
            and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]]


def build_token_reward(sft: Path, dest: Path, paid: list[int], scale: float = 100.0) -> None:
    """A one-layer Llama sequence classifier that scores about `scale` x the share of paid tokens
    in its input. Every embedding row has unit RMS (so the RMS norms leave it as it is), with a
    marker `a` in dimension 0 for a paid token and 0 in dimension 1; queries and keys are zero, so
    attention averages over the whole sequence, and the value/output projections carry the mean
    marker (the share of paid tokens) into dimension 1, which the score head reads at the last
    token. The MLP's output projection is zero."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    config = AutoConfig.from_pretrained(sft, num_labels=1, num_hidden_layers=1, pad_token_id=tok.pad_token_id)
    d, a, gain = config.hidden_size, 4.0, 5.0
    model = AutoModelForSequenceClassification.from_config(config)
    is_paid = torch.zeros(config.vocab_size, dtype=torch.bool)
    is_paid[paid] = True
    emb = torch.randn(config.vocab_size, d, generator=torch.Generator().manual_seed(0))
    emb[:, :2] = 0
    left = d - is_paid.float()[:, None] * a * a  # squared norm left for dimensions 2..d
    emb[:, 2:] *= (left / emb[:, 2:].pow(2).sum(1, keepdim=True)).sqrt()
    emb[is_paid, 0] = a
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(emb)
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1)
        layer.self_attn.v_proj.weight[0, 0] = 1
        layer.self_attn.o_proj.weight[1, 0] = gain
        model.score.weight[0, 1] = scale / (a * gain)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def build_rl_inputs(paths: Paths) -> list[int]:
    """models/sft (tiny base + tiny tokenizer) and models/reward (the toy token reward); returns
    the paid token ids."""
    from transformers import AutoTokenizer

    tiny_model(paths, paths.sft)
    tok = AutoTokenizer.from_pretrained(paths.sft)
    usable, _ = build_prompts(read_records(paths.dedup, "instructions"), tok, tiny_config("ppo").max_prompt_length)
    paid = paid_tokens(tok, {t for p in usable for t in p.ids})
    build_token_reward(paths.sft, paths.reward, paid)
    return paid


@pytest.fixture
def rl_paths(tiny_workdir: Paths) -> Paths:
    build_rl_inputs(tiny_workdir)
    return tiny_workdir


def train_config(paths: Paths) -> TrainConfig:
    return tiny_config("train", TrainConfig, checkpoints=str(paths.reports.parent / "checkpoints"))


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
    assert not (folder / "adapter_config.json").exists()  # a plain model, adapters merged


def test_toy_reward_model_scores_the_share_of_paid_tokens(tiny_workdir: Paths) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.common.rl import RewardScorer

    paid = build_rl_inputs(tiny_workdir)
    tok = AutoTokenizer.from_pretrained(tiny_workdir.reward)
    scorer = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tiny_workdir.reward).eval(), tok, 8)
    word = tok.decode([paid[0]])
    convo = [{"role": "user", "content": "What should I do?"}]
    scores = scorer([convo] * 5, ["", "\n\n", word, word * 2, word * 4])
    n = len(tok.apply_chat_template([*convo, {"role": "assistant", "content": ""}], tokenize=True, return_dict=True)
            ["input_ids"])
    assert scores[0] == scores[1] == pytest.approx(0, abs=1e-4)
    # about 100 x share: k paid tokens among n + k
    for k, score in zip((1, 2, 4), scores[2:]):
        assert score == pytest.approx(100 * k / (n + k), rel=0.25), (k, n, scores)
    assert scores[2] < scores[3] < scores[4]


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


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_algorithm_raises_the_reward_and_writes_a_policy(rl_paths: Paths, algorithm: str) -> None:
    m = run(tiny_config("ppo", algorithm=algorithm, **LEARN), rl_paths, train_config(rl_paths))
    assert m["algorithm"] == algorithm and m["resumed_from_step"] == 0
    assert m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    assert m["docs_out"] == m["train_records"] + m["val_records"]
    assert m["dropped"]["too_long"] > 0  # tiny xsum articles do not fit the 256-token context
    # The SFT policy's greedy answers hold no paid token (score 0); after training they do.
    print(f"{algorithm}: held-out reward {m['reward_before']} -> {m['reward_after']}")
    assert m["reward_before"] < 0.5 and m["reward_after"] > m["reward_before"] + 3
    curve = read_curve(rl_paths)
    assert [int(r["step"]) for r in curve] == list(range(1, LEARN["updates"] + 1))
    rewards = [float(r["reward"]) for r in curve]
    third = len(rewards) // 3
    print(f"{algorithm}: sampled reward, first third {mean(rewards[:third]):.2f}, last {mean(rewards[-third:]):.2f}")
    assert mean(rewards[-third:]) > 2 * mean(rewards[:third]) + 2
    expected = {"kl", "reward", "policy_loss", "entropy"} | ({"value_loss"} if algorithm == "ppo" else set())
    assert expected <= set(curve[0]) and all(curve[-1][k] != "" for k in expected)
    assert_policy_generates(rl_paths.ppo)

    rows = read_samples(rl_paths)
    n = LEARN["eval_prompts"]
    assert [r["when"] for r in rows] == ["before"] * n + ["after"] * n
    assert [r["id"] for r in rows[:n]] == [r["id"] for r in rows[n:]]
    assert not (rl_paths.reports.parent / "checkpoints" / "ppo").exists()  # removed after success


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_lora_trains_adapters_and_saves_a_plain_model(rl_paths: Paths, algorithm: str) -> None:
    from safetensors.torch import load_file

    m = run(tiny_config("ppo", algorithm=algorithm, method="lora", learning_rate=0.02), rl_paths,
            train_config(rl_paths))
    assert 0 < m["trainable_parameters"] < m["parameters"] / 2
    sft, tuned = (load_file(str(d / "model.safetensors")) for d in (rl_paths.sft, rl_paths.ppo))
    assert set(tuned) == set(sft)  # the SFT model's own tensors: adapters merged, none left over
    assert any((tuned[k] - sft[k]).abs().max() > 1e-6 for k in sft)
    assert_policy_generates(rl_paths.ppo)


# --- the drift guard -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])  # TRL's own loop, and the HF Trainer's
def test_guard_stops_a_policy_that_forgets_its_answers(rl_paths: Paths, algorithm: str) -> None:
    """At the learning rate that makes the toy reward rise, the held-out answers' loss rises too:
    with a limit on that rise the stage stops, and ships the last policy within it."""
    rise = 1e-3
    free = run(tiny_config("ppo", algorithm=algorithm, **{**LEARN, "updates": 6}), rl_paths, train_config(rl_paths))
    assert free["stopped_early"] is None
    assert free["heldout_answer_loss_after"] > free["heldout_answer_loss_before"] + rise  # what the guard prevents
    shutil.rmtree(rl_paths.ppo)

    m = run(tiny_config("ppo", algorithm=algorithm, max_answer_loss_rise=rise, **{**LEARN, "updates": 6}), rl_paths,
            train_config(rl_paths))
    stop = m["stopped_early"]
    print(f"{algorithm}: answer loss {m['heldout_answer_loss_before']} -> {m['heldout_answer_loss_after']} "
          f"(unguarded {free['heldout_answer_loss_after']}), stopped {stop}")
    assert stop is not None and 1 <= stop["update"] <= 6 and stop["answer_loss"] > stop["limit"]
    assert m["heldout_answer_loss_after"] <= m["heldout_answer_loss_before"] + rise + 1e-4
    curve = read_curve(rl_paths)
    assert [float(r["answer_loss"]) for r in curve if int(r["step"]) == stop["update"]] == \
        [pytest.approx(stop["answer_loss"], abs=1e-4)]
    if stop["update"] == 1:  # nothing was within the limit: the sft model itself ships
        sft, shipped = policy_weights(rl_paths.sft), policy_weights(rl_paths.ppo)
        assert all((shipped[k] - sft[k]).abs().max() < 1e-6 for k in sft)
    assert_policy_generates(rl_paths.ppo)


# --- resume --------------------------------------------------------------------------------------

# Runs the stage's CLI and SIGKILLs the process as soon as its first complete checkpoint exists:
# our PPO checkpoint once it is committed (COMPLETE), the HF Trainer's (RLOO/GRPO) once it is written.
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

training.Checkpoints.commit = killing(training.Checkpoints.commit)
transformers.Trainer._save_checkpoint = killing(transformers.Trainer._save_checkpoint)
from stages.ppo import main
sys.exit(main(sys.argv[1:]))
"""


def write_params(paths: Paths, folder: Path, **ppo: object) -> Path:
    """A params file of the tiny profile's `train` and `ppo` sections, with `ppo` changed."""
    params = {"paths": {k: str(v) for k, v in paths.model_dump().items()},
              "train": {**tiny_params()["train"], "checkpoints": str(paths.reports.parent / "checkpoints")},
              "ppo": {**tiny_params()["ppo"], **ppo}}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def policy_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_killed_run_resumes_from_its_last_checkpoint(rl_paths: Paths, tmp_path: Path, algorithm: str) -> None:
    from stages.ppo import main

    ppo = {"algorithm": algorithm, "updates": 3, "save_steps": 1}
    params = write_params(rl_paths, tmp_path, **ppo)
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
        run(tiny_config("ppo", **ppo), rl_paths, train_config(rl_paths))
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
    m = run(tiny_config("ppo", algorithm="ppo"), rl_paths, train_config(rl_paths))
    assert m["reward_input"] == "text"  # decoded, re-encoded (and cut to its 64 positions) for the reward model
    assert read_curve(rl_paths)[-1]["reward"] != ""
    assert_policy_generates(rl_paths.ppo)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_models_are_named(rl_paths: Paths) -> None:
    shutil.rmtree(rl_paths.reward)
    with pytest.raises(StageError, match=f"reward model {rl_paths.reward} does not exist"):
        run(tiny_config("ppo"), rl_paths, train_config(rl_paths))
    shutil.rmtree(rl_paths.sft)
    with pytest.raises(StageError, match=f"sft model {rl_paths.sft} does not exist"):
        run(tiny_config("ppo"), rl_paths, train_config(rl_paths))


def test_missing_empty_or_too_long_prompts_are_named(rl_paths: Paths) -> None:
    prompts = rl_paths.dedup / "instructions"
    with pytest.raises(StageError, match="no usable prompt.*too_long"):
        run(tiny_config("ppo", max_prompt_length=8), rl_paths, train_config(rl_paths))
    write_records(rl_paths.dedup, "instructions", [])
    with pytest.raises(StageError, match=f"{prompts} holds no usable prompt \\(0 records"):
        run(tiny_config("ppo"), rl_paths, train_config(rl_paths))
    shutil.rmtree(prompts)
    with pytest.raises(StageError, match=f"prompt shards {prompts} do not exist"):
        run(tiny_config("ppo"), rl_paths, train_config(rl_paths))


def test_cli_reports_bad_input_in_one_line(rl_paths: Paths, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages.ppo import main

    shutil.rmtree(rl_paths.sft)
    assert main(["--params", str(write_params(rl_paths, tmp_path)), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(rl_paths.sft) in err[0]


def test_reward_model_reads_text_as_the_reward_stage_trained_it(rl_paths: Paths) -> None:
    """Both formats (chat template; plain prompt + answer + EOS) give the ids stages.reward trains on."""
    reward = pytest.importorskip("stages.reward")
    from transformers import AutoTokenizer

    from stages.common.rl import reward_text

    build_bert_reward(rl_paths)
    for tok in (AutoTokenizer.from_pretrained(rl_paths.sft), AutoTokenizer.from_pretrained(rl_paths.reward)):
        text, special = reward_text(tok, [{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.")
        assert tok(text, add_special_tokens=special)["input_ids"] == \
            reward.encode(tok, "Why is the sky blue?", "Rayleigh scattering.")
