"""Promise: `make ui` prints its address and serves the project's own store as a new user needs it:
the address opens the experiment's training runs, and a stage's metrics, input datasets and report
files are there (tests/flows/test_browser.py opens that address in a browser). The test takes the
commands from `make -n ui` (so it checks the Makefile's flags) and runs them itself, stopping the
server by its process group."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stages.common.tracking import EXPERIMENT
from tests.conftest import ROOT
from tests.flows.conftest import free_port, stop

DIGEST = "0123456789abcdef0123456789abcdef.dir"  # the shape of a DVC folder hash


def get(base: str, endpoint: str, **query: str) -> bytes:
    url = f"{base}/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose default store holds one stage run, logged the way every stage logs."""
    from stages.common import tracking

    root = tmp_path / "project"
    report = root / "reports/clean"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text(json.dumps({"docs_in": 10, "docs_out": 8}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store, as `make ui` reads it
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with tracking.stage_run("clean", {"max_chars": 100}, root=root, report_dir=report):
        tracking.log_stage_result("clean", {"docs_in": 10, "docs_out": 8}, report, root=root)
        tracking.log_inputs({"data/raw": DIGEST})
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()
    return root


def make_ui(project: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`make ui UI_PORT=port` in `project`, its commands as `make -n` prints them (so the Makefile's
    flags are what runs) with this checkout's environment; once the UI answers: (its process, the
    address it printed first). Stop it with `stop`."""
    # -n: print the recipe without running it; -o: take the set-up as done; BIN: this checkout's venv
    shown = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "-o", ".venv/.installed", "ui",
                            f"UI_PORT={port}", f"BIN={ROOT / '.venv/bin'}"], cwd=project, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the code of this checkout, wherever the project is
    with log.open("w") as out:
        server = subprocess.Popen(["bash", "-c", shown.stdout], cwd=project, stdout=out, stderr=subprocess.DEVNULL,
                                  env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while True:
        try:
            if get(base, "health"):
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            pytest.fail(f"mlflow ui did not start ({server.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.5)
    first = log.read_text().splitlines()[0]  # the address comes first, before the server's own lines
    address = first.removeprefix("MLflow UI: ").removesuffix(" (Ctrl-C stops it)")
    assert first == f"MLflow UI: {address} (Ctrl-C stops it)", first
    return server, address


def test_make_ui_serves_the_projects_runs(project: Path, tmp_path: Path) -> None:
    port = free_port()
    server, address = make_ui(project, port, tmp_path / "ui.out")
    base = f"http://127.0.0.1:{port}"
    try:
        exp = json.loads(get(base, "ajax-api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT))
        # the address opens the experiment's training runs, in the UI's model-training mode
        experiment_id = exp["experiment"]["experiment_id"]
        assert address == f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        (run,) = post(base, "ajax-api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
        run_id = run["info"]["run_id"]
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"docs_in": 10, "docs_out": 8}
        (dataset,) = [i["dataset"] for i in run["inputs"]["dataset_inputs"]]
        assert (dataset["name"], dataset["digest"]) == ("data/raw", DIGEST)
        # the report files, stored under the project's mlartifacts/, come back through the server
        listed = json.loads(get(base, "ajax-api/2.0/mlflow/artifacts/list", run_id=run_id, path="clean"))
        assert "clean/metrics.json" in {f["path"] for f in listed["files"]}
        served = get(base, "get-artifact", path="clean/metrics.json", run_uuid=run_id)
        assert served == (project / "reports/clean/metrics.json").read_bytes()
    finally:
        stop(server)
