"""pretrain: the loss goes down, LoRA saves a plain model, same inputs give the same metrics,
a killed run resumes from its checkpoint to the same result, and bad inputs fail before training."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.common.config import Paths, StageError
from stages.common.training import TrainConfig, launch_command
from stages.pretrain import PretrainConfig, run
from tests.conftest import tiny_config, tiny_params

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"tokens_per_second", "seconds", "mfu"}


def train_cfg(tmp_path: Path, **kw) -> TrainConfig:
    return tiny_config("train", TrainConfig, checkpoints=str(tmp_path / "checkpoints"), **kw)


def test_loss_goes_down_and_the_model_folder_is_complete(tiny_workdir: Paths, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from stages.common.lm import load_causal_lm, perplexity, val_blocks

    cfg = tiny_config("pretrain")
    m = run(cfg, tiny_workdir, train_cfg(tmp_path))
    assert m["perplexity_after"] < 0.9 * m["perplexity_before"]
    assert m["steps"] == cfg.max_steps and m["resumed_from_step"] == 0 and m["mfu"] is None  # no peak FLOPs on CPU
    assert m["tokens"] == cfg.max_steps * cfg.batch_size * 64 and m["tokens_per_second"] > 0
    out = tiny_workdir.pretrain
    # the folder holds the trained weights: its held-out perplexity is the one the stage measured
    blocks = val_blocks(tiny_workdir.tokenized, cfg.eval_batches * cfg.batch_size)
    assert perplexity(load_causal_lm(out), blocks, cfg.batch_size) == pytest.approx(m["perplexity_after"], rel=1e-3)
    assert len(AutoTokenizer.from_pretrained(out)) <= 1024
    assert yaml.safe_load((out / "llm_forge.yaml").read_text())["pretrain"]["max_steps"] == cfg.max_steps
    assert json.loads((out / "metrics.json").read_text())["perplexity_after"] == m["perplexity_after"]
    curves = (tiny_workdir.report_dir("pretrain") / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and "train_loss" in curves[0] and "val_loss" in curves[0]
    assert [line.split(",")[0] for line in curves[1:]] == [str(i) for i in range(cfg.max_steps + 1)]
    assert not (tmp_path / "checkpoints" / "pretrain").exists()  # removed after success


def test_lora_saves_a_plain_merged_model(tiny_workdir: Paths, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("pretrain", max_steps=3, save_steps=0, method="lora",
                      lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    m = run(cfg, tiny_workdir, train_cfg(tmp_path))
    assert m["method"] == "lora" and 0 < m["trainable_parameters"] < m["parameters"] / 5
    out = tiny_workdir.pretrain
    assert not list(out.glob("adapter_*")), "peft files in the output"
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_workdir.base)
    keys = set(merged.state_dict())
    assert keys == set(base.state_dict()) and not any("lora" in k for k in keys)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not merged.state_dict()[q].equal(base.state_dict()[q])  # the adapters were merged in
    k = "model.layers.0.self_attn.k_proj.weight"
    assert merged.state_dict()[k].equal(base.state_dict()[k])  # untouched where there was no adapter


def test_same_params_and_data_give_the_same_metrics(tiny_workdir: Paths, tmp_path: Path) -> None:
    cfg = tiny_config("pretrain", max_steps=3, gradient_accumulation_steps=2, batch_size=4, eval_batches=1,
                      method="lora", lora={"r": 4, "dropout": 0.1})  # dropout: the RNG is seeded too
    first = run(cfg, tiny_workdir, train_cfg(tmp_path))
    second = run(cfg, tiny_workdir, train_cfg(tmp_path))
    assert {k: v for k, v in first.items() if k not in TIMING} == {k: v for k, v in second.items() if k not in TIMING}
    other = run(cfg.model_copy(update={"seed": 1}), tiny_workdir, train_cfg(tmp_path))
    assert other["train_loss_final"] != first["train_loss_final"]


def test_killed_run_resumes_from_its_checkpoint_to_the_same_result(tiny_workdir: Paths, tmp_path: Path) -> None:
    # The real CLI in a subprocess, killed (SIGKILL) as soon as a complete checkpoint exists;
    # enough steps that it is still training then.
    section = {**tiny_params()["pretrain"], "max_steps": 20, "batch_size": 4, "save_steps": 4, "eval_batches": 1}
    ckpts = tmp_path / "checkpoints"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {k: str(v) for k, v in tiny_workdir.model_dump().items()},
        "pretrain": section,
        "train": {**tiny_params()["train"], "checkpoints": str(ckpts)},
    }))
    cmd = [sys.executable, "-m", "stages.pretrain", "--params", str(params), "--no-mlflow"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((ckpts / "pretrain").glob("checkpoint-*/COMPLETE")):
            assert proc.poll() is None, f"the stage ended before its first checkpoint: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not tiny_workdir.pretrain.exists()  # a killed stage leaves no output

    # Rerun (in this process, to spare a second start-up): it resumes from the checkpoint.
    resumed = run(PretrainConfig.model_validate(section), tiny_workdir, train_cfg(tmp_path))
    assert resumed["resumed_from_step"] > 0 and resumed["resumed_from_step"] % 4 == 0
    assert resumed["steps"] == 20 and tiny_workdir.pretrain.exists() and not ckpts.joinpath("pretrain").exists()
    # the curve holds the steps before the kill too
    curve = (tiny_workdir.report_dir("pretrain") / "curves.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == [str(i) for i in range(21)]

    uninterrupted = run(PretrainConfig.model_validate(section), tiny_workdir, train_cfg(tmp_path / "fresh"))
    assert uninterrupted["resumed_from_step"] == 0
    for key in ("train_loss_final", "val_loss_after", "perplexity_before"):
        assert resumed[key] == uninterrupted[key], key


def test_resume_restores_the_rng_that_dropout_draws_from(tiny_workdir: Paths, tmp_path: Path) -> None:
    # A finished run that kept its checkpoint at step 3; the same params again (output deleted)
    # resume from it and must replay steps 4-6 exactly: weights, optimizer, schedule, data
    # position, and the RNG state of LoRA dropout.
    cfg = tiny_config("pretrain", max_steps=6, save_steps=3, eval_batches=1, method="lora",
                      lora={"r": 4, "dropout": 0.2})
    train = train_cfg(tmp_path, keep_checkpoints=True)
    first = run(cfg, tiny_workdir, train)
    assert (tmp_path / "checkpoints/pretrain/checkpoint-3/COMPLETE").exists()
    shutil.rmtree(tiny_workdir.pretrain)
    again = run(cfg, tiny_workdir, train)
    assert (first["resumed_from_step"], again["resumed_from_step"]) == (0, 3)
    for key in ("train_loss_final", "val_loss_after", "perplexity_before"):
        assert again[key] == first[key], key


def test_vocabulary_mismatch_fails_before_training(tiny_workdir: Paths, tmp_path: Path) -> None:
    config = tiny_workdir.base / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "vocab_size": 100}))
    with pytest.raises(StageError, match=rf"{tiny_workdir.tokenized}.*token id \d+.*vocabulary of 100"):
        run(tiny_config("pretrain"), tiny_workdir, train_cfg(tmp_path))
    assert not tiny_workdir.pretrain.exists() and not (tmp_path / "checkpoints").exists()


def test_blocks_longer_than_the_model_takes_fail_before_training(tiny_workdir: Paths, tmp_path: Path) -> None:
    config = tiny_workdir.base / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 32}))
    with pytest.raises(StageError, match=rf"{tiny_workdir.tokenized}.*blocks of 64 tokens.*at most 32"):
        run(tiny_config("pretrain"), tiny_workdir, train_cfg(tmp_path))


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="max_stepz"):
        PretrainConfig.model_validate({"max_stepz": 3})


@pytest.mark.parametrize("distributed", ["fsdp", "deepspeed", "deepspeed_zero2"])
def test_every_accelerate_config_loads_and_launches_all_processes(distributed: str) -> None:
    """Each `train.distributed` names a config accelerate reads; one machine needs no address."""
    from accelerate.commands.config.config_args import load_config_from_file

    train = tiny_config("train", TrainConfig, num_processes=8, distributed=distributed)
    cmd = launch_command("sft", train, ["--params", "p.yaml"], env={})
    config = Path(cmd[cmd.index("--config_file") + 1])
    assert load_config_from_file(str(config)).distributed_type.value.lower() == distributed.split("_")[0]
    assert cmd[cmd.index("--num_processes") + 1] == "8" and "--num_machines" not in cmd
    assert cmd[-4:] == ["-m", "stages.sft", "--params", "p.yaml"]


def test_several_machines_take_rank_and_address_from_the_environment() -> None:
    train = tiny_config("train", TrainConfig, num_processes=16, num_machines=2)
    with pytest.raises(StageError, match="train.num_machines is 2: set MASTER_ADDR, MASTER_PORT on every machine"):
        launch_command("pretrain", train, [], env={"NODE_RANK": "1"})
    env = {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    cmd = launch_command("pretrain", train, [], env=env)
    flags = dict(zip(cmd[3:-2:2], cmd[4:-2:2]))
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29500"
    assert flags["--num_processes"] == "16"
