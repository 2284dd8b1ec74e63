"""sft: the stage on the tiny inputs (random-init tiny Llama, ChatML tokenizer, real instructions).

There is no pretrain stage output here, so `models/pretrain/` is the tiny base model plus the
tokenizer that `tokenize` trained for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import sft
from stages.common.config import Paths, StageError
from stages.common.io import read_records, write_records
from stages.common.lm import load_chat_tokenizer
from stages.common.training import TrainConfig, load_trainable_lm
from tests.conftest import tiny_config, tiny_params

ROOT = Path(__file__).resolve().parents[2]
# Faster than the tiny profile: no checkpoint unless a test asks for one.
FAST = {"batch_size": 4, "logging_steps": 2, "save_steps": 1000}


def config(**changes: object) -> sft.SftConfig:
    return tiny_config("sft", **{**FAST, **changes})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def sft_paths(tiny_workdir: Paths) -> Paths:
    shutil.copytree(tiny_workdir.base, tiny_workdir.pretrain)
    shutil.copytree(tiny_workdir.tokenized / "tokenizer", tiny_workdir.pretrain, dirs_exist_ok=True)
    return tiny_workdir


def checkpoints(paths: Paths, **changes: object) -> TrainConfig:
    return tiny_config("train", TrainConfig, checkpoints=str(paths.reports.parent / "checkpoints"), **changes)


def generates(folder: Path) -> str:
    """Load `folder` as a plain causal LM (no peft, no quantization) and answer one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (folder / "adapter_config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    enc = tok.apply_chat_template([{"role": "user", "content": "Hello?"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    return tok.decode(out[0])


def test_full_run_learns_and_writes_a_plain_model(sft_paths: Paths) -> None:
    cfg = config(method="full", learning_rate=1e-3, max_steps=20)
    m = sft.run(cfg, sft_paths, checkpoints(sft_paths))

    assert m["val_loss_after"] < m["val_loss_before"] - 0.2  # the held-out answers got likelier
    assert m["resumed_from_step"] == 0 and m["steps"] == 20
    assert m["docs_in"] == m["docs_out"] + sum(m["dropped"].values())
    assert m["truncated"] > 0 and "too_long" not in m["dropped"]  # long xsum articles are cut, not dropped
    assert m["trainable_parameters"] == m["parameters"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm_forge.yaml", "metrics.json"):
        assert (sft_paths.sft / name).is_file(), name
    assert yaml.safe_load((sft_paths.sft / "llm_forge.yaml").read_text())["sft"]["method"] == "full"
    generates(sft_paths.sft)
    rows = [json.loads(line) for line in (sft_paths.reports / "sft/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"id", "prompt", "reference", "before", "after"} <= set(rows[0])
    # what evaluate's instruction loss is measured on: every held-out example as sft rendered it
    held = [json.loads(line) for line in sft_paths.sft_held_out().read_text().splitlines()]
    assert len(held) == m["val_records"] > 0 and [r["id"] for r in held[:2]] == [r["id"] for r in rows]
    assert held[0]["completion"][0]["role"] == "assistant" and held[0]["prompt"][-1]["role"] == "user"
    curves = (sft_paths.reports / "sft/curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and len(curves) > 5
    assert not (sft_paths.reports.parent / "checkpoints/sft").exists()  # removed after success


def test_lora_adapters_are_merged_into_a_plain_model(sft_paths: Paths) -> None:
    from safetensors.torch import load_file

    cfg = config(method="lora", learning_rate=5e-3, max_steps=6)
    m = sft.run(cfg, sft_paths, checkpoints(sft_paths))
    assert m["trainable_parameters"] < m["parameters"] / 2
    generates(sft_paths.sft)
    base = load_file(sft_paths.pretrain / "model.safetensors")
    tuned = load_file(sft_paths.sft / "model.safetensors")
    assert set(tuned) == set(base)  # the same plain layout as the base: no lora_A / lora_B
    assert any(not (tuned[k].float() - base[k].float()).abs().max() < 1e-7 for k in base)  # merged, not dropped


def test_qlora_trains_on_cpu_and_ships_full_precision(sft_paths: Paths) -> None:
    cfg = config(method="qlora", learning_rate=5e-3, max_steps=3)
    m = sft.run(cfg, sft_paths, checkpoints(sft_paths))
    assert m["steps"] == 3 and m["method"] == "qlora"
    generates(sft_paths.sft)


@pytest.mark.skipif(_cuda(), reason="the path of a machine without CUDA")
def test_bf16_on_a_cpu_trains_under_autocast_and_ships_fp32(sft_paths: Paths) -> None:
    """`train.precision: bf16` on a machine without CUDA: transformers' trainer refuses bf16 there
    unless told the CPU is the device (`use_cpu`); with it, the step runs under CPU autocast."""
    cfg = config(method="lora", learning_rate=5e-3, max_steps=6)
    m = sft.run(cfg, sft_paths, checkpoints(sft_paths, precision="bf16"))
    assert m["precision"] == "bf16" and m["val_loss_after"] < m["val_loss_before"]
    generates(sft_paths.sft)  # a plain fp32 model, as in fp32


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_qlora_on_gpu_in_bf16(sft_paths: Paths) -> None:
    cfg = config(method="qlora", learning_rate=5e-3, max_steps=6)
    m = sft.run(cfg, sft_paths, checkpoints(sft_paths, precision="bf16"))
    assert m["precision"] == "bf16" and m["val_loss_after"] < m["val_loss_before"]
    generates(sft_paths.sft)


def test_loss_is_on_the_answer_only(sft_paths: Paths) -> None:
    """What the trainer feeds the model: every prompt token (system, user, the assistant header)
    is -100 in the labels, every answer token (and its end-of-turn) is learned."""
    tok = load_chat_tokenizer(sft_paths.pretrain, "SFT renders conversations with it")
    model = load_trainable_lm(sft_paths.pretrain, "full", "fp32", "sft")
    example, _ = sft.to_prompt_completion({"id": "x", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, I think."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."}]})
    cfg = config(method="full")
    trainer = sft.build_trainer(cfg, model, tok, [example], [], sft_paths.reports.parent / "ck", "fp32")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    prompt_ids = tok.apply_chat_template(example["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == list(prompt_ids)
    assert all(label == -100 for label in labels[:n])  # the whole prompt, the earlier answer included
    assert labels[n:] == ids[n:] and len(ids) > n
    learned = tok.decode(labels[n:])
    assert learned.startswith("Green.") and "<|im_end|>" in learned and "Blue" not in learned


def test_bad_records_are_counted_and_the_split_is_stable(sft_paths: Paths) -> None:
    tok = load_chat_tokenizer(sft_paths.pretrain, "SFT renders conversations with it")
    ok = [{"id": f"ok/{i}", "source": "t", "messages": [{"role": "user", "content": f"Question {i}?"},
                                                        {"role": "assistant", "content": f"Answer {i}."}]}
          for i in range(40)]
    bad = [
        {"id": "b/1", "source": "t", "messages": [{"role": "user", "content": "no answer"}]},
        {"id": "b/2", "source": "t", "messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "  "}]},
        {"id": "b/3", "source": "t", "messages": [{"role": "assistant", "content": "an answer to nothing"}]},
        {"id": "b/4", "source": "t", "messages": [{"role": "user", "content": "Say it at length."},
                                                  {"role": "assistant", "content": "word " * 400}]},
        {"id": "b/5", "source": "t", "messages": [{"role": "system", "content": "rule " * 400},
                                                  {"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "ok"}]},
    ]
    cfg = config()
    train, val, dropped, truncated = sft.prepare(ok + bad, tok, cfg)
    assert dropped == {"no_answer": 1, "empty_answer": 1, "no_prompt": 1, "answer_too_long": 1,
                       "context_too_long": 1}
    assert len(train) + len(val) == 40 and val and truncated == 0
    again, val_again, _, _ = sft.prepare(list(reversed(ok)), tok, cfg)
    assert {e["id"] for e in val_again} == {e["id"] for e in val}  # by id hash, not by position


def test_a_long_input_loses_its_tail_never_the_answer(sft_paths: Paths) -> None:
    """An article longer than max_length is cut from its end: the instruction before it and the
    whole answer stay, and the rendering fits; a record that fits is left as it is."""
    tok = load_chat_tokenizer(sft_paths.pretrain, "SFT renders conversations with it")
    cfg = config(max_length=96)
    instruction = "Summarize the following article in one sentence.\n\n"
    article = " ".join(f"Sentence {i} of the article, in Zürich — “quoted” 日本語." for i in range(100))
    answer = "Someone wrote one hundred sentences."
    records = [{"id": "long", "source": "t", "messages": [{"role": "user", "content": instruction + article},
                                                          {"role": "assistant", "content": answer}]},
               {"id": "short", "source": "t", "messages": [{"role": "user", "content": "Question?"},
                                                           {"role": "assistant", "content": "Answer."}]}]
    assert sft.rendered_length(tok, sft.to_prompt_completion(records[0])[0]) > 10 * cfg.max_length

    train, val, dropped, truncated = sft.prepare(records, tok, cfg)
    kept = {e["id"]: e for e in train + val}
    assert set(kept) == {"long", "short"} and not dropped and truncated == 1
    cut = kept["long"]
    assert cut["completion"] == [{"role": "assistant", "content": answer}]
    content = cut["prompt"][0]["content"]
    assert content.startswith(instruction + "Sentence 0 of the article")
    assert article.startswith(content[len(instruction):])  # the article's head, as text (no broken character)
    assert cfg.max_length - 4 <= sft.rendered_length(tok, cut) <= cfg.max_length  # as much as fits
    assert kept["short"] == sft.to_prompt_completion(records[1])[0]

    # what the trainer feeds the model: the whole cut example, the whole answer learned
    model = load_trainable_lm(sft_paths.pretrain, "full", "fp32", "sft")
    trainer = sft.build_trainer(cfg, model, tok, [cut], [], sft_paths.reports.parent / "ck", "fp32")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(ids) == sft.rendered_length(tok, cut)
    assert tok.decode([t for t in labels if t != -100]).startswith(answer + "<|im_end|>")


def test_no_usable_record_is_an_error_naming_the_file(sft_paths: Paths) -> None:
    write_records(sft_paths.dedup, "instructions",
                  [{"id": "a", "source": "t", "messages": [{"role": "user", "content": "unanswered"}]}])
    with pytest.raises(StageError, match=r"dedup/instructions has no usable instruction record"):
        sft.run(config(), sft_paths, checkpoints(sft_paths))


def test_killed_run_resumes_from_its_last_checkpoint(sft_paths: Paths, tmp_path: Path) -> None:
    """Run the stage as a process, SIGKILL it once a checkpoint is on disk, run it again."""
    assert read_records(sft_paths.dedup, "instructions")
    ck = tmp_path / "checkpoints"
    params = {"paths": {k: str(v) for k, v in sft_paths.model_dump().items()},
              "sft": {**tiny_params()["sft"], "method": "full", "learning_rate": 1e-3, "max_steps": 12,
                      "save_steps": 2, "logging_steps": 1, "samples": 0},
              "train": {**tiny_params()["train"], "checkpoints": str(ck)}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.sft", "--params", str(params_file), "--no-mlflow"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(ck.glob("sft/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, f"the stage ended before a checkpoint: {proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not sft_paths.sft.exists()  # nothing half-written where DVC looks

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((sft_paths.reports / "sft/metrics.json").read_text())
    assert m["resumed_from_step"] > 0 and m["steps"] == 12
    assert m["resumed_from_step"] % 2 == 0
    assert (sft_paths.sft / "model.safetensors").is_file()
    steps = [int(line.split(",")[0]) for line in (sft_paths.reports / "sft/curves.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[0] < m["resumed_from_step"] < steps[-1]  # one curve across both runs
