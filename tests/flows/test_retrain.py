"""Promise: the retraining deployment, served to a real Prefect server and triggered through it,
promotes a candidate that beats the champion beyond the interval and keeps the champion against
one that does not; a run with nothing new ends early and says so; one pipeline run per project.

The project is a copy of the tiny pipeline's. Its champion is made by hand from the untrained base
model (registered the way the register stage registers), so the first trigger must promote the
pipeline's final model on the tiny profile's primary metric (held-out instruction loss); then the
candidate alias is pointed at that untrained model, so the second trigger must refuse it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, project_env, run_in
from tests.flows.conftest import screenshot, wait_http
from tests.flows.test_mlflow_ui import free_port, stop

pytestmark = pytest.mark.slow

NAME = "llm-forge"
DEPLOYMENT = "llm-forge-retrain/scheduled"


@pytest.fixture(scope="module")
def project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny project that ran, with the untrained base model registered as champion."""
    dest = tmp_path_factory.mktemp("retrain") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    script = f"""
import mlflow
from pathlib import Path
from stages.common import tracking
from stages.common.config import load_section, read_yaml
from stages.register import MD5_TAG, Candidate, RegisterConfig, log_and_register
cfg = load_section(RegisterConfig, "register", read_yaml(Path("params.yaml")))
tracking.setup(Path("."))
with mlflow.start_run(run_name="hand-registered"):
    v = log_and_register(Candidate("{NAME}", Path("models/base"), "base", True), cfg,
                         {{MD5_TAG: "untrained-base"}}, {{}}, {{}})
mlflow.MlflowClient().set_registered_model_alias("{NAME}", "champion", v.version)
print(v.version)
"""
    run_in(dest, "-c", script)
    run_in(dest, "-m", "dvc", "remote", "add", "--local", "--default", "store", str(dest.parent / "remote"))
    return dest


def client(project: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def alias(project: Path, name: str) -> str:
    return str(client(project).get_model_version_by_alias(NAME, name).version)


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    """`prefect server start` on loopback, and `python -m flows.retrain --serve` in the project."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**project_env(project), "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_UI_API_URL": api}
    srv = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                            "--port", str(port)], cwd=home, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=(home / "server.log").open("w"))
    served = None
    try:
        wait_http(f"{api}/health", 240, srv)
        served = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--serve"], cwd=project, env=env,
                                  start_new_session=True, stdout=(home / "serve.log").open("w"),
                                  stderr=subprocess.STDOUT)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env, "log": home / "serve.log"}
    finally:
        if served is not None:
            stop(served)
        stop(srv)


def api_settings(server: dict):
    """This test process's Prefect client pointed at the test's server (settings are read once
    per process, so a changed environment variable would not reach it)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: server["api"]})


def deployment_of(server: dict):
    """The served deployment, once the serving process has registered it."""
    from prefect.client.orchestration import get_client

    deadline, error = time.monotonic() + 180, None
    with api_settings(server), get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            try:
                return c.read_deployment_by_name(DEPLOYMENT)
            except Exception as err:  # not registered yet
                error = err
                time.sleep(2)
    pytest.fail(f"the deployment never showed up ({error!r}):\n" + server["log"].read_text()[-3000:])


def trigger(server: dict) -> str:
    """Run the deployment through the server, wait for it, and return its Prefect artifact `gate`
    (the decision as the run published it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    deployment_of(server)
    with api_settings(server):
        run = run_deployment(DEPLOYMENT, timeout=900)
        assert run.state.is_completed(), f"{run.state}\n" + server["log"].read_text()[-3000:]
        with get_client(sync_client=True) as c:
            found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate"])),
                                     flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert len(found) == 1, found
    return json.loads(found[0].data) if found[0].data.startswith('"') else found[0].data


def gate_file(project: Path) -> dict:
    return json.loads((project / "reports/retrain/gate.json").read_text())


def test_the_served_deployment_promotes_a_better_model_and_keeps_the_champion_against_a_worse(
        project: Path, server: dict) -> None:
    untrained = alias(project, "champion")
    trained = alias(project, "candidate")
    assert untrained != trained

    artifact = trigger(server)
    first = gate_file(project)
    assert artifact.startswith("## Promoted") and first["decision"]["reason"] in artifact
    assert first["decision"]["promote"], first["decision"]["reason"]
    primary = first["decision"]["checks"][0]
    assert primary["metric"] == "instruction_loss" and primary["low"] > 0 and primary["improvement"] >= 0.05
    assert alias(project, "champion") == trained and alias(project, "previous-champion") == untrained
    tags = client(project).get_model_version(NAME, trained).tags
    assert tags["gate.decision"] == "promoted" and tags["gate.champion_version"] == untrained
    assert first["pipeline_run"] is None  # nothing to rerun: the pipeline flow did not run
    # the run pushed what dvc.lock names to the project's remote: a fresh pull needs nothing else
    assert any((project.parent / "remote").rglob("*")), "dvc push sent nothing"
    status = run_in(project, "-m", "dvc", "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout

    # the untrained model comes back as the candidate: worse on the primary metric, refused
    client(project).set_registered_model_alias(NAME, "candidate", untrained)
    artifact = trigger(server)
    second = gate_file(project)
    assert artifact.startswith("## Kept the champion")
    assert not second["decision"]["promote"]
    assert "instruction_loss improves by -" in second["decision"]["reason"]
    assert alias(project, "champion") == trained  # did not move
    assert client(project).get_model_version(NAME, untrained).tags["gate.decision"] == "kept"

    # the same data and a judged candidate: ends early, and says why
    artifact = trigger(server)
    assert artifact.startswith("## Nothing to retrain") and "the data did not change" in artifact
    assert gate_file(project) == second
    assert alias(project, "champion") == trained


def test_a_second_pipeline_run_stops_without_writing(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from flows.pipeline import project_lock\n"
         "with project_lock():\n    print('held', flush=True); time.sleep(120)"],
        cwd=project, env=project_env(project), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run_in(project, "-m", "flows.pipeline", check=False)
        assert done.returncode == 3, done.stderr[-2000:]
        assert f"pid {holder.pid}" in done.stderr and "stops without writing anything" in done.stderr
        assert not (project / "reports").exists() and not (project / "mlflow.db").exists()
    finally:
        stop(holder)
    assert run_in(project, "-c", "from flows.pipeline import project_lock\nwith project_lock(): pass").returncode == 0


def test_the_prefect_ui_shows_the_deployment_and_its_schedule(project: Path, server: dict, browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    deployment = deployment_of(server)
    schedule = yaml.safe_load((project / "params.yaml").read_text())["retrain"]["schedule"]
    assert [s.schedule.cron for s in deployment.schedules] == [schedule]
    browser.get(f"{server['ui']}/deployments/deployment/{deployment.id}")

    def shown(driver) -> str | bool:
        text = driver.find_element("tag name", "body").text
        # "Scheduled for": the server's scheduler made the next run (it cannot with SQLAlchemy 2.1)
        return text if "llm-forge-retrain" in text and "Scheduled for" in text else False

    try:
        text = WebDriverWait(browser, 60).until(shown)
    finally:
        screenshot(browser, "prefect-deployment")
    print(text)
    assert "Monday" in text  # the default cron, 0 3 * * 1, as the UI spells it
