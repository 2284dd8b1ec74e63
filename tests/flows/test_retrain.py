"""Promise: the retraining deployment, deployed to a work pool of a real Prefect server and run by a
real `prefect worker`, promotes a candidate that beats the champion beyond the interval and keeps
the champion against one that does not; a run with nothing new ends early and says so; a run that
comes due while one runs is cancelled by the deployment's concurrency limit before it starts, and
the Prefect UI says why; a message reaches the team's webhook (a loopback HTTP receiver here) when
the gate moves `champion`, with the run's name and the gate's reason, and when a run fails; one
pipeline run per project.

The project is a copy of the tiny pipeline's. Its champion is made by hand from the untrained base
model (registered the way the register stage registers), so the first run must promote the
pipeline's final model on the tiny profile's primary metric (held-out instruction loss); then the
candidate alias is pointed at that untrained model, so the second run must refuse it."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_project, project_env, run_in
from tests.flows.conftest import free_port, screenshot, stop

pytestmark = pytest.mark.slow

NAME = "llm-forge"
DEPLOYMENT = "llm-forge-retrain/scheduled"
BLOCK = "llm-forge-test"  # the test's notification block, a custom webhook to the receiver
RUN_S = 900  # one retraining run of the tiny project, on a busy machine


class Receiver:
    """A loopback HTTP server that keeps every JSON body posted to it (a team's chat webhook)."""

    def __init__(self) -> None:
        received = self.messages = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, found: Callable[[dict], bool], what: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [m for m in list(self.messages) if found(m)]
            if hits:
                return hits[0]
            time.sleep(1)
        pytest.fail(f"no message {what} within {timeout:.0f} s; received: {self.messages}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny project that ran, with the untrained base model registered as champion
    and messages sent through the notification block BLOCK."""
    dest = tmp_path_factory.mktemp("retrain") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    script = f"""
import mlflow
from pathlib import Path
from stages.common import tracking
from stages.common.config import load_section, read_yaml
from stages.common.lineage import Record
from stages.register import FOLDER_TAG, MD5_TAG, Candidate, RegisterConfig, log_and_register
cfg = load_section(RegisterConfig, "register", read_yaml(Path("params.yaml")))
tracking.setup(Path("."))
with mlflow.start_run(run_name="hand-registered"):
    v = log_and_register(Candidate("{NAME}", Path("models/base"), "base", True), cfg,
                         {{MD5_TAG: "untrained-base", FOLDER_TAG: "models/base"}}, Record({{}}, {{}}, {{}}, {{}}),
                         {{}}, {{}})
mlflow.MlflowClient().set_registered_model_alias("{NAME}", "champion", v.version)
print(v.version)
"""
    run_in(dest, "-c", script)
    run_in(dest, "-m", "dvc", "remote", "add", "--local", "--default", "store", str(dest.parent / "remote"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["retrain"]["notify"] = f"custom-webhook/{BLOCK}"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def client(project: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def alias(project: Path, name: str) -> str:
    return str(client(project).get_model_version_by_alias(NAME, name).version)


def api_settings(server: dict):
    """This test process's Prefect client pointed at the test's server (settings are read once
    per process, so a changed environment variable would not reach it)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: server["api"]})


@pytest.fixture(scope="module")
def worker(project: Path, prefect_server: dict, receiver: Receiver) -> Iterator[dict]:
    """The notification block, `python -m flows.deploy` (make deploy) and `python -m flows.deploy
    --worker` (make worker) in the project, against the session's Prefect server."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    with api_settings(prefect_server):
        CustomWebhookNotificationBlock(name=BLOCK, url=receiver.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(BLOCK,
                                                                                                      overwrite=True)
    env = {**project_env(project), **{k: prefect_server["env"][k] for k in ("PREFECT_HOME", "PREFECT_API_URL")},
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    deployed = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr[-3000:]
    log = project.parent / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--worker"], cwd=project, env=env,
                                   start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield {**prefect_server, "deployed": deployed.stdout, "log": log}
    finally:
        stop(process)


def read(server: dict, what: str, *args: Any, **kwargs: Any) -> Any:
    from prefect.client.orchestration import get_client

    with api_settings(server), get_client(sync_client=True) as c:
        return getattr(c, what)(*args, **kwargs)


def start(server: dict, **parameters: Any) -> Any:
    """A run of the deployment, scheduled now (as the schedule makes one): the worker takes it."""
    from prefect.deployments import run_deployment

    with api_settings(server):
        return run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)


def wait(server: dict, run_id: Any, done: Callable[[Any], bool], timeout: float = RUN_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = read(server, "read_flow_run", run_id)
        if done(run):
            return run
        time.sleep(2)
    pytest.fail(f"flow run {run_id} still {run.state.name} after {timeout:.0f} s:\n"
                + server["log"].read_text()[-3000:])


def finished(server: dict, run_id: Any) -> Any:
    return wait(server, run_id, lambda r: r.state.is_final())


def gate_artifact(server: dict, run_id: Any) -> str:
    """The run's Prefect artifact `gate`: the decision as the run published it."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    found = read(server, "read_artifacts", artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate"])),
                 flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert len(found) == 1, found
    return json.loads(found[0].data) if found[0].data.startswith('"') else found[0].data


def gate_file(project: Path) -> dict:
    return json.loads((project / "reports/retrain/gate.json").read_text())


def test_the_deployment_is_on_the_work_pool_with_its_schedule_limit_and_messages(project: Path,
                                                                                   worker: dict) -> None:
    retrain = yaml.safe_load((project / "params.yaml").read_text())["retrain"]
    deployment = read(worker, "read_deployment_by_name", DEPLOYMENT)
    assert deployment.work_pool_name == retrain["work_pool"]
    assert read(worker, "read_work_pool", retrain["work_pool"]).type == "process"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == \
        [(retrain["schedule"], retrain["timezone"])]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployment.entrypoint == "flows.retrain.retrain" and deployment.job_variables == {
        "working_dir": str(project)}
    names = {a.name for a in read(worker, "read_automations")}
    assert {"llm-forge: retraining failed", "llm-forge: champion moved"} <= names, names
    assert f"messages through custom-webhook/{BLOCK}" in worker["deployed"]


def test_the_worker_promotes_a_better_model_cancels_a_run_due_meanwhile_and_says_so(
        project: Path, worker: dict, receiver: Receiver) -> None:
    untrained = alias(project, "champion")
    trained = alias(project, "candidate")
    assert untrained != trained

    first = start(worker)
    wait(worker, first.id, lambda r: r.state.is_running() or r.state.is_final())
    # the next one comes due while the first runs: the limit cancels it before it starts
    second = start(worker)
    cancelled = finished(worker, second.id)
    assert cancelled.state.name == "Cancelled" and cancelled.state.message == "Deployment concurrency limit reached."
    assert not [s for s in read(worker, "read_flow_run_states", second.id) if s.type.value in ("PENDING", "RUNNING")]
    done = finished(worker, first.id)
    assert done.state.is_completed(), f"{done.state}\n" + worker["log"].read_text()[-3000:]

    artifact = gate_artifact(worker, first.id)
    decided = gate_file(project)
    assert artifact.startswith("## Promoted") and decided["decision"]["reason"] in artifact
    assert decided["decision"]["promote"], decided["decision"]["reason"]
    primary = decided["decision"]["checks"][0]
    assert primary["metric"] == "instruction_loss" and primary["low"] > 0 and primary["improvement"] >= 0.05
    assert alias(project, "champion") == trained and alias(project, "previous-champion") == untrained
    tags = client(project).get_model_version(NAME, trained).tags
    assert tags["gate.decision"] == "promoted" and tags["gate.champion_version"] == untrained
    assert decided["pipeline_run"] is None  # nothing to rerun: the pipeline flow did not run
    # the run pushed what dvc.lock names to the project's remote: a fresh pull needs nothing else
    assert any((project.parent / "remote").rglob("*")), "dvc push sent nothing"
    status = run_in(project, "-m", "dvc", "status", "--cloud")
    assert "in sync" in status.stdout, status.stdout

    # the team hears of it: the run's name, the decision's reason and its figures
    message = receiver.wait_for(lambda m: f"version {trained} is champion" in m["subject"], "about the promotion")
    assert done.name in message["body"] and decided["decision"]["reason"] in message["body"]
    assert f"was version {untrained}" in message["body"] and "| primary | instruction_loss |" in message["body"]

    # the untrained model comes back as the candidate: worse on the primary metric, refused
    client(project).set_registered_model_alias(NAME, "candidate", untrained)
    second = finished(worker, start(worker).id)
    assert second.state.is_completed(), second.state
    assert gate_artifact(worker, second.id).startswith("## Kept the champion")
    kept = gate_file(project)
    assert not kept["decision"]["promote"]
    assert "instruction_loss improves by -" in kept["decision"]["reason"]
    assert alias(project, "champion") == trained  # did not move
    assert client(project).get_model_version(NAME, untrained).tags["gate.decision"] == "kept"

    # the same data and a judged candidate: ends early, and says why
    third = finished(worker, start(worker).id)
    artifact = gate_artifact(worker, third.id)
    assert artifact.startswith("## Nothing to retrain") and "the data did not change" in artifact
    assert gate_file(project) == kept
    assert alias(project, "champion") == trained
    promotions = [m for m in receiver.messages if "is champion" in m["subject"]]
    assert len(promotions) == 1, promotions  # a kept champion sends no message


def test_a_run_that_fails_sends_a_message_with_its_name_and_error(project: Path, worker: dict,
                                                                  receiver: Receiver) -> None:
    failed = finished(worker, start(worker, params_file="no-such-params.yaml").id)
    assert failed.state.is_failed(), failed.state
    message = receiver.wait_for(lambda m: failed.name in m["subject"], "about the failed run")
    assert message["subject"] == f"llm-forge: retraining run {failed.name} Failed"
    assert "params file no-such-params.yaml does not exist" in message["body"]


def test_the_prefect_ui_shows_the_deployment_the_cancelled_run_and_the_evaluation_chart(
        project: Path, worker: dict, browser) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from stages.common.tables import with_chart

    def page(url: str, shows: Callable[[str], bool], name: str) -> str:
        def shown(b: Any) -> str | bool:
            text = b.find_element(By.TAG_NAME, "body").text
            return text if shows(text) else False

        browser.get(url)
        try:
            return WebDriverWait(browser, 60).until(shown)
        finally:
            screenshot(browser, name)

    deployment = read(worker, "read_deployment_by_name", DEPLOYMENT)
    text = page(f"{worker['ui']}/deployments/deployment/{deployment.id}",
                lambda t: "llm-forge-retrain" in t and "Scheduled for" in t, "prefect-deployment")
    assert "Monday" in text  # the default cron, 0 3 * * 1, as the UI spells it
    assert "llm-forge" in text  # its work pool

    # the run the limit cancelled says why, on its own page (its Details tab)
    (cancelled,) = read(worker, "read_flow_runs", flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Cancelled"]))))
    page(f"{worker['ui']}/runs/flow-run/{cancelled.id}", lambda t: "Cancelled" in t and "Details" in t,
         "prefect-cancelled-run")
    browser.find_element(By.XPATH, "//*[normalize-space()='Details']").click()
    text = WebDriverWait(browser, 30).until(lambda b: "State Message" in (t := b.find_element(
        By.TAG_NAME, "body").text) and t)
    screenshot(browser, "prefect-cancelled-run-details")
    assert "State Message\nDeployment concurrency limit reached." in text

    # the pipeline's artifact `evaluation`: the table and the chart reports/evaluate/chart.png holds
    report = project / "reports/evaluate"
    with api_settings(worker):
        artifact_id = create_markdown_artifact(key="evaluation", markdown=with_chart(report / "table.md",
                                                                                      report / "chart.png"))
    page(f"{worker['ui']}/artifacts/artifact/{artifact_id}", lambda t: "perplexity" in t, "prefect-evaluation")
    (chart,) = browser.find_elements(By.XPATH, "//img[@alt='chart.png']")
    width = WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].naturalWidth", chart))
    from PIL import Image

    assert width == Image.open(report / "chart.png").width  # the image decoded, as drawn


def test_make_serve_is_the_same_deployment_from_one_process(project: Path, worker: dict) -> None:
    """The one-process way registers the deployment with the same schedule and limit, without the
    work pool: it runs the flow runs itself (last here: it takes the deployment from the pool)."""
    env = {**project_env(project), **{k: worker["env"][k] for k in ("PREFECT_HOME", "PREFECT_API_URL")}}
    log = project.parent / "serve.log"
    with log.open("w") as out:
        served = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--serve"], cwd=project, env=env,
                                  start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while (deployment := read(worker, "read_deployment_by_name", DEPLOYMENT)).work_pool_name is not None:
            assert served.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        retrain = yaml.safe_load((project / "params.yaml").read_text())["retrain"]
        assert [s.schedule.cron for s in deployment.schedules] == [retrain["schedule"]]
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    finally:
        stop(served)


def test_deploying_without_a_server_is_one_sentence(capsys: pytest.CaptureFixture) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):  # nothing listens there
        assert main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the Prefect server at http://127.0.0.1:") and err.count("\n") == 0, err
    assert "does not answer" in err and "prefect server start" in err


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
