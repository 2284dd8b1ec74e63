"""Promise: a broken params.yaml is named key by key, for the whole pipeline at once, before any
stage does work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from stages.common.config import ConfigError
from stages.common.params_check import check_params
from stages.common.profile import apply
from tests.conftest import ROOT, make_project, run_in

# Four kinds of mistake, each in another stage's section; each must be named by its key.
MISTAKES = {
    "tokenize.block_size": ("wrong type", lambda p: p["tokenize"].update(block_size="large")),
    "dedup.thresold": ("unknown key", lambda p: p["dedup"].update(thresold=0.5)),
    "pretrain.learning_rate": ("negative learning rate", lambda p: p["pretrain"].update(learning_rate=-0.001)),
    "collect.sources.1.path": ("missing source", lambda p: p["collect"]["sources"][1].update(path="gone/corpus.txt")),
    "train.num_processes": ("a shared section's value", lambda p: p["train"].update(num_processes=0)),
}


def broken(params: dict) -> dict:
    for _, change in MISTAKES.values():
        change(params)
    return params


@pytest.mark.parametrize("profile", [None, "tiny"])
def test_the_shipped_params_pass(tmp_path: Path, profile: str | None) -> None:
    params_file = ROOT / "params.yaml"
    if profile:
        params_file = tmp_path / "params.yaml"
        apply(ROOT / "profiles" / f"{profile}.yaml", ROOT / "params.yaml", params_file)
    check_params(params_file, ROOT / "dvc.yaml", ROOT)


def test_every_problem_is_named_in_one_message(tmp_path: Path) -> None:
    params = broken(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["evaluatee"] = {"limit": 1}
    del params["validate"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        check_params(tmp_path / "params.yaml", ROOT / "dvc.yaml", ROOT)
    message = str(caught.value)
    for key in [*MISTAKES, "evaluatee", "validate"]:
        assert f"\n  {key}: " in message, (key, message)
    assert "collect.sources.1.path: gone/corpus.txt does not exist" in message
    assert "dedup.thresold: unknown key" in message
    assert "evaluatee: unknown section" in message and "validate: section is missing" in message


def test_the_flow_stops_before_any_stage_with_every_key_named(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    params = broken(yaml.safe_load((project / "params.yaml").read_text()))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    started = time.perf_counter()
    done = run_in(project, "-m", "flows.pipeline", check=False)
    took = time.perf_counter() - started
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr  # one message ...
    assert f"{len(MISTAKES)} problems" in errors[0]
    for key in MISTAKES:  # ... naming every key
        assert f"  {key}: " in done.stderr, (key, done.stderr)
    # no stage started: nothing written, no MLflow run, no flow run
    assert not list(project.glob(".prefect/*.db"))
    for name in ("data", "models", "reports", "mlflow.db", "mlartifacts", "dvc.lock"):
        assert not (project / name).exists(), name
    assert took < 60, took

    # the same check as a command of its own, with the same message
    check = run_in(project, "-m", "stages.common.params_check", check=False)
    assert check.returncode == 2 and check.stderr == done.stderr


def test_a_stage_run_alone_names_its_own_keys(tmp_path: Path) -> None:
    """`python -m stages.<name>` checks its own section the same way (exit 2, key named)."""
    project = make_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dedup"]["thresold"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run_in(project, "-m", "stages.dedup", "--no-mlflow", check=False)
    assert done.returncode == 2 and "dedup.thresold: unknown key" in done.stderr
    assert not (project / "data").exists()
