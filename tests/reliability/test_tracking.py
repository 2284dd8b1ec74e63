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

from stages.common.config import Paths
from stages.common.tracking import EXPERIMENT, OFFLINE_FILE, flatten_numbers
from tests.conftest import ROOT, project_env, tiny_params

# Every key of the `paths` section, from the one place that lists them.
PATH_KEYS = tuple(Paths.model_fields)

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


def start_server(port: int, store: str, artifacts: Path) -> subprocess.Popen:
    """`mlflow server` on loopback `port` with `store`, once it answers its health check."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", store, "--default-artifact-root", str(artifacts),
                             "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 150
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on a free loopback port: (uri, process, its store's URI)."""
    port = free_port()
    store = f"sqlite:///{tmp_path / 'server.db'}"
    proc = start_server(port, store, tmp_path / "server-art")
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
    assert (tmp_path / "data/raw/corpus/part-00000.parquet").exists()
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


# --- what the MLflow UI shows of a stage: its input data and the experiment's kind --------------

# Two stages: `make` writes data/raw, `use` reads it (and its own code) and logs an MLflow run.
LINEAGE_DVC = """
stages:
  make:
    cmd: mkdir -p data/raw && echo a > data/raw/a.txt && echo b > data/raw/b.txt
    outs:
      - data/raw
  use:
    cmd: python use.py
    deps:
      - use.py
      - data/raw
    outs:
      - data/used
"""
LINEAGE_STAGE = """
import pathlib
from stages.common import tracking

report = pathlib.Path("reports/use")
with tracking.stage_run("use", {"files": 2}, report_dir=report):
    out = pathlib.Path("data/used")
    out.mkdir(parents=True)
    (out / "count.txt").write_text(str(len(list(pathlib.Path("data/raw").iterdir()))))
    report.mkdir(parents=True, exist_ok=True)
    tracking.log_stage_result("use", {"files": 2}, report)
"""


def lineage_project(project: Path, uri: str) -> subprocess.CompletedProcess:
    """The two-stage project at `project`, reproduced by DVC with MLflow at `uri`."""
    project.mkdir()
    (project / "dvc.yaml").write_text(LINEAGE_DVC)
    (project / "use.py").write_text(LINEAGE_STAGE)
    env = env_for(project, uri)
    for args in (["init", "--no-scm", "-q"], ["repro"]):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def locked_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (md5,) = [dep["md5"] for dep in lock["stages"][stage]["deps"] if dep["path"] == path]
    return md5


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The two-stage project reproduced against a SQLite store: (project, the store's URI)."""
    project = tmp_path_factory.mktemp("lineage") / "project"
    uri = f"sqlite:///{project / 'mlflow.db'}"
    lineage_project(project, uri)
    return project, uri


def test_a_stage_run_lists_the_data_it_read_with_the_dvc_hash(lineage: tuple[Path, str]) -> None:
    import mlflow

    project, uri = lineage
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'use'")
    inputs = [(i.dataset.name, i.dataset.digest, json.loads(i.dataset.source)["uri"], i.dataset.source_type)
              for i in run.inputs.dataset_inputs]
    md5 = locked_md5(project, "use", "data/raw")
    assert md5.endswith(".dir")  # a folder's hash, the longest DVC writes
    # the data the stage read, named by its path; its own code is no dataset
    assert inputs == [("data/raw", md5, "data/raw", "local")]
    assert run.data.tags["dvc.deps.data/raw"] == md5
    assert not (project / "reports/use" / OFFLINE_FILE).exists()  # nothing failed on the way


def test_the_experiment_opens_on_its_training_runs(lineage: tuple[Path, str]) -> None:
    import mlflow

    from stages.common.tracking import KIND, KIND_TAG

    _, uri = lineage
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    assert exp.tags[KIND_TAG] == KIND == "custom_model_development"


def test_an_existing_experiment_is_marked_unless_a_user_chose_its_kind(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from stages.common import tracking

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment(tracking.EXPERIMENT)  # made before experiments were marked
    assert tracking.setup(tmp_path) == old
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == tracking.KIND
    client.set_experiment_tag(old, tracking.KIND_TAG, "genai_development")  # chosen in the UI
    tracking.setup(tmp_path)
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == "genai_development"


def test_without_a_server_the_inputs_are_kept_with_the_metrics(tmp_path: Path) -> None:
    project = tmp_path / "project"
    port = free_port()  # nothing listens there
    done = lineage_project(project, f"http://127.0.0.1:{port}")
    kept = json.loads((project / "reports/use" / OFFLINE_FILE).read_text())
    assert kept["inputs"] == {"data/raw": locked_md5(project, "use", "data/raw")}
    assert kept["metrics"] == {"files": 2.0} and kept["tracking_uri"] == f"http://127.0.0.1:{port}"
    assert len(offline_lines(done.stderr)) == 1


def test_the_projects_own_store_keeps_artifacts_in_the_project(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from stages.common import tracking

    own = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a flow's stages inherit the URI the flow's own setup exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own)
    exp = mlflow.MlflowClient(tracking_uri=own).get_experiment(tracking.setup(tmp_path))
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    # another store decides where its artifacts go
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.chdir(other)  # where MLflow's default puts them
    exp = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}").get_experiment(
        tracking.setup(tmp_path))
    assert "mlartifacts" not in exp.artifact_location


# --- the replay: what a stage kept offline goes to the server once it is back --------------------

# A stage named by its first argument; it writes a report file and a training curve, and, when
# told to, waits once its MLflow run is open until the test has stopped the server.
OFFLINE_STAGE = """
import pathlib, sys
import time
from stages.common.config import StageConfig
from stages.common.runner import run_stage

class FakeConfig(StageConfig):
    files: int

def run(cfg, paths):
    name = sys.argv[1]
    if sys.argv[2] == "wait":
        pathlib.Path("started").touch()
        while not pathlib.Path("go").exists():
            time.sleep(0.05)
    report = paths.report_dir(name)
    (report / "table.md").write_text(f"{name}'s table")
    (report / "curves.csv").write_text("step,train_loss\\n0,2.5\\n1,2.0\\n2,1.5\\n")
    return {"docs_in": cfg.files, "docs_out": cfg.files, "dropped": {"none": 0}}

sys.exit(run_stage(sys.argv[1], FakeConfig, run, ["--params", "params.yaml"]))
"""


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_replay_sends_what_stages_kept_offline_once(tmp_path: Path, mlflow_server) -> None:
    import mlflow

    from stages.common.tracking import PARENT_ENV, REPLAYED_TAG

    uri, server, store = mlflow_server
    port = int(uri.rsplit(":", 1)[1])
    project = tmp_path / "project"
    project.mkdir()
    params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "early": {"files": 3}, "late": {"files": 5}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, run_name="pipeline").info.run_id  # as the pipeline flow makes it
    env = {**env_for(project, uri), PARENT_ENV: parent}

    # `early` opens its run, then the server stops; `late` starts while it is down
    early = subprocess.Popen([sys.executable, "-c", OFFLINE_STAGE, "early", "wait"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (project / "started").exists():
        assert early.poll() is None and time.monotonic() < deadline, early.communicate()
        time.sleep(0.05)
    stop(server)
    (project / "go").touch()
    assert early.wait(timeout=120) == 0, early.stderr.read()[-3000:]
    late = subprocess.run([sys.executable, "-c", OFFLINE_STAGE, "late", "now"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert late.returncode == 0, late.stderr[-3000:]
    records = {n: json.loads((project / f"out/reports/{n}" / OFFLINE_FILE).read_text()) for n in ("early", "late")}
    assert records["early"]["run_id"] and records["late"]["run_id"] is None
    assert {r["parent_run_id"] for r in records.values()} == {parent}

    restarted = start_server(port, store, tmp_path / "server-art")  # the same server, back
    try:
        replay = [sys.executable, "-m", "stages.common.tracking", "replay"]
        first = subprocess.run(replay, cwd=project, env=env_for(project, uri), capture_output=True, text=True,
                               timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr[-3000:]
        assert first.stdout.count("sent as run") == 2, first.stdout
        runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
        assert sorted(runs) == ["early", "late", "pipeline"]
        assert runs["early"].info.run_id == records["early"]["run_id"]  # the run the stage had opened
        for name, files in (("early", 3), ("late", 5)):
            run = runs[name]
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
            assert run.data.params == {"files": str(files)}
            # the stage's metrics, and the last point of its curve (what the UI's metrics column shows)
            assert run.data.metrics == {**records[name]["metrics"], "train_loss": 1.5}
            assert run.data.metrics["docs_out"] == files
            listed = {a.path for a in client.list_artifacts(run.info.run_id, name)}
            assert {f"{name}/metrics.json", f"{name}/table.md", f"{name}/curves.csv"} <= listed
            assert f"{name}/{OFFLINE_FILE}" not in listed
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == \
                [(0, 2.5), (1, 2.0), (2, 1.5)]
            assert run.data.tags[REPLAYED_TAG] == records[name]["id"]

        # a second replay adds nothing: no run, no metric point, no artifact
        def state() -> list:
            found = client.search_runs([experiment_id])
            return sorted((r.info.run_name, r.data.metrics, len(client.get_metric_history(r.info.run_id, "train_loss")),
                           sorted(a.path for a in client.list_artifacts(r.info.run_id, r.info.run_name)))
                          for r in found)

        before = state()
        again = subprocess.run(replay, cwd=project, env=env_for(project, uri), capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0 and again.stdout.count("already sent") == 2, again.stdout + again.stderr
        assert state() == before
    finally:
        os.killpg(restarted.pid, signal.SIGKILL)
        restarted.wait()
