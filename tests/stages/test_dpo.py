"""dpo: DPO, KTO, ORPO and SimPO each learn a separable preference (held-out accuracy rises), LoRA
and QLoRA ship a plain model, a killed run resumes, the cached reference must belong to the sft model.

The sft model is the tiny random-init base with the tiny tokenizer; the pairs (`toy_pairs`) differ
in the first words of the answer (polite vs rude), so a policy that learns the preference ranks
held-out pairs it never trained on.
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
from stages import dpo, reference
from stages.common.config import Paths, StageError
from stages.common.io import write_records
from stages.common.training import TrainConfig
from tests.conftest import tiny_config, tiny_model, tiny_params
from tests.stages.test_reference import toy_pairs

ROOT = Path(stages.__file__).resolve().parent.parent
# Enough steps at a high learning rate for the tiny random-init model to learn the preference.
LEARN = {"dpo": dict(learning_rate=3e-3, max_steps=12), "kto": dict(learning_rate=3e-3, max_steps=12),
         "orpo": dict(learning_rate=3e-3, max_steps=12, beta=0.5), "simpo": dict(learning_rate=3e-3, max_steps=12)}


@pytest.fixture
def dpo_paths(tiny_workdir: Paths) -> Paths:
    """models/sft, 80 policy pairs (and a few of another part) and data/reference from them."""
    tiny_model(tiny_workdir, tiny_workdir.sft)
    write_records(tiny_workdir.dedup, "preferences", toy_pairs(80) + toy_pairs(10, "reward", 100))
    reference.run(tiny_config("reference"), tiny_workdir)
    return tiny_workdir


def train_config(paths: Paths, keep: bool = False) -> TrainConfig:
    return tiny_config("train", TrainConfig, checkpoints=str(paths.reports.parent / "checkpoints"),
                       keep_checkpoints=keep)


def read_curve(paths: Paths) -> list[dict[str, str]]:
    with (paths.report_dir("dpo") / "curves.csv").open() as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_plain_model(folder: Path, sft: Path) -> None:
    tuned, base = weights(folder), weights(sft)
    assert set(tuned) == set(base)  # the sft model's own tensors: adapters merged, none left over
    assert any((tuned[k] - base[k]).abs().max() > 1e-6 for k in base)
    assert not (folder / "adapter_config.json").exists()
    assert (folder / "llm_forge.yaml").exists() and (folder / "tokenizer_config.json").exists()


@pytest.mark.parametrize("algorithm", ["dpo", "kto", "orpo", "simpo"])
def test_algorithm_learns_a_separable_preference(dpo_paths: Paths, algorithm: str) -> None:
    cfg = tiny_config("dpo", algorithm=algorithm, **LEARN[algorithm])
    m = dpo.run(cfg, dpo_paths, train_config(dpo_paths))
    print(f"{algorithm}: held-out accuracy {m['heldout_accuracy_before']} -> {m['heldout_accuracy_after']}, "
          f"per-token log-prob accuracy {m['heldout_logp_accuracy_before']} -> {m['heldout_logp_accuracy_after']}")
    assert m["algorithm"] == algorithm and m["resumed_from_step"] == 0 and m["steps"] == cfg.max_steps
    assert m["docs_in"] == 80 and m["val_records"] >= 10 and m["train_records"] + m["val_records"] == 80
    if algorithm in ("dpo", "kto"):  # before training the policy is the reference: every pair a tie
        assert m["heldout_accuracy_before"] == 0.5 and m["heldout_margin_before"] == 0
    assert m["heldout_accuracy_after"] >= 0.9 and m["heldout_margin_after"] > 0
    assert m["heldout_logp_accuracy_after"] > m["heldout_logp_accuracy_before"]
    curve = read_curve(dpo_paths)
    assert curve[0]["step"] == "0" and curve[-1]["step"] == str(cfg.max_steps) and "loss" in curve[0]
    assert float(curve[-1]["heldout_accuracy"]) == m["heldout_accuracy_after"]
    assert_plain_model(dpo_paths.dpo, dpo_paths.sft)
    samples = [json.loads(line) for line in (dpo_paths.report_dir("dpo") / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == cfg.samples and all({"before", "after", "prompt"} <= set(s) for s in samples)
    assert not (dpo_paths.reports.parent / "checkpoints" / "dpo").exists()  # removed after success


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_are_merged_into_a_plain_model(dpo_paths: Paths, method: str) -> None:
    m = dpo.run(tiny_config("dpo", method=method, learning_rate=1e-2, max_steps=3), dpo_paths,
                train_config(dpo_paths))
    assert m["method"] == method and 0 < m["trainable_parameters"] < m["parameters"] / 2
    assert_plain_model(dpo_paths.dpo, dpo_paths.sft)


def test_reference_of_another_sft_model_is_refused(dpo_paths: Paths) -> None:
    (dpo_paths.sft / "config.json").write_text((dpo_paths.sft / "config.json").read_text() + "\n")
    with pytest.raises(StageError, match=r"data/reference holds the log-probs of another sft model"):
        dpo.run(tiny_config("dpo"), dpo_paths, train_config(dpo_paths))


# --- resume --------------------------------------------------------------------------------------

# Runs the stage's CLI and SIGKILLs it as soon as the HF Trainer has written its first checkpoint.
KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
import transformers

original = transformers.Trainer._save_checkpoint
def killing(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

transformers.Trainer._save_checkpoint = killing
from stages.dpo import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_model(dpo_paths: Paths, tmp_path: Path) -> None:
    changes = {"max_steps": 4, "save_steps": 2, "learning_rate": 3e-3, "logging_steps": 1}
    params = {"paths": {k: str(v) for k, v in dpo_paths.model_dump().items()},
              "train": {**tiny_params()["train"], "checkpoints": str(dpo_paths.reports.parent / "checkpoints")},
              "dpo": {**tiny_params()["dpo"], **changes}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, "--params", str(params_file),
                             "--no-mlflow"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = dpo_paths.reports.parent / "checkpoints" / "dpo"
    assert (checkpoints / "checkpoint-2").is_dir() and not dpo_paths.dpo.exists()

    assert dpo.main(["--params", str(params_file), "--no-mlflow"]) == 0
    metrics = json.loads((dpo_paths.report_dir("dpo") / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert [int(r["step"]) for r in read_curve(dpo_paths)] == [0, 1, 2, 3, 4]  # the killed run's points kept
    resumed = weights(dpo_paths.dpo)
    assert not checkpoints.exists()

    shutil.rmtree(dpo_paths.dpo)
    dpo.run(tiny_config("dpo", **changes), dpo_paths, train_config(dpo_paths))
    unbroken = weights(dpo_paths.dpo)
    assert all((resumed[k] - unbroken[k]).abs().max() < 1e-5 for k in unbroken)
