"""Promise: a tracking server that is down, or goes down while a stage runs, costs no stage and no
metric: the stage finishes, says in one line where its metrics went, and keeps them beside
`metrics.json` in `reports/<stage>/mlflow_offline.json`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stages.common.tracking import OFFLINE_FILE, flatten_numbers
from tests.conftest import ROOT, project_env, tiny_params

PATH_KEYS = ("raw", "clean", "quarantine", "dedup", "base", "tokenized", "pretrain", "sft", "reward", "ppo",
             "quantized", "reports")

# A stage that waits, once its MLflow run is open, until the test has killed the server.
WAITING_STAGE = """
import pathlib, sys, time
from stages.common.config import StageConfig
from stages.common.io import atomic_dir
from stages.common.runner import run_stage

class FakeConfig(StageConfig):
    files: int

def run(cfg, paths):
    pathlib.Path("started").touch()
    while not pathlib.Path("go").exists():
        time.sleep(0.05)
    with atomic_dir(paths.raw) as tmp:
        for i in range(cfg.files):
            (tmp / f"part-{i}.txt").write_text("data")
    return {"docs_in": cfg.files, "docs_out": cfg.files, "dropped": {"none": 0}}

sys.exit(run_stage("fake", FakeConfig, run))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(project: Path, uri: str) -> dict[str, str]:
    env = project_env(project)
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = str(ROOT)
    return env


def offline_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "unreachable" in line]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on a free loopback port: (uri, process, its store's URI)."""
    port = free_port()
    store = f"sqlite:///{tmp_path / 'server.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", store, "--default-artifact-root", str(tmp_path / "server-art"),
                             "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 150
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", proc, store
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_server_dies_while_a_stage_runs(tmp_path: Path, mlflow_server) -> None:
    uri, server, store = mlflow_server
    project = tmp_path / "project"
    project.mkdir()
    params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "fake": {"files": 3}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = subprocess.Popen([sys.executable, "-c", WAITING_STAGE], cwd=project, env=env_for(project, uri),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (project / "started").exists():
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)  # the run is open on the server; the server goes
    server.wait()
    (project / "go").touch()
    started = time.monotonic()
    out, err = stage.communicate(timeout=120)
    took = time.monotonic() - started

    assert stage.returncode == 0, err[-3000:]
    assert took < 60, took
    assert sorted(p.name for p in (project / "out/raw").iterdir()) == ["part-0.txt", "part-1.txt", "part-2.txt"]
    metrics = json.loads((project / "out/reports/fake/metrics.json").read_text())
    kept = json.loads((project / "out/reports/fake" / OFFLINE_FILE).read_text())
    assert kept["metrics"] == flatten_numbers(metrics)
    assert kept["params"] == {"files": "3"} and kept["stage"] == "fake"
    (line,) = offline_lines(err)
    assert f"out/reports/fake/{OFFLINE_FILE}" in line and uri in line
    # the run the server got before it died is the one the kept record names
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=store).get_run(kept["run_id"])
    assert run.info.run_name == "fake" and run.data.params == {"files": "3"}


def test_no_server_at_all_costs_a_real_stage_nothing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    uri = f"http://canary-user:CanaryPasswordInUri42@127.0.0.1:{port}"
    params = tiny_params()
    params = {**params, "paths": {k: str(tmp_path / v) for k, v in params["paths"].items()}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stages.collect", "--params", str(tmp_path / "params.yaml")],
                          cwd=ROOT, env=env_for(tmp_path, uri), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert took < 90, took
    assert (tmp_path / "data/raw/corpus.parquet").exists()
    report = tmp_path / "reports/collect"
    metrics = json.loads((report / "metrics.json").read_text())
    kept = json.loads((report / OFFLINE_FILE).read_text())
    assert kept["metrics"] == flatten_numbers(metrics) and kept["metrics"]["docs_in"] > 0
    assert kept["run_id"] is None and kept["params"]["limit"] == "60"
    (line,) = offline_lines(done.stderr)
    assert str(report / OFFLINE_FILE) in line and f"http://127.0.0.1:{port}" in line
    # the credentials in the URI are never written out
    assert "CanaryPasswordInUri42" not in done.stderr + done.stdout
    assert all("CanaryPasswordInUri42" not in p.read_text() for p in report.iterdir())
