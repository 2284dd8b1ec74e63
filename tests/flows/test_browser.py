"""Promise: the MLflow UI compares two pipeline runs in a real browser. A test starts `mlflow server`
on loopback (the flags `make ui` uses), logs two runs into the project's experiment through it, opens
the compare view of the two in headless Chromium and checks that the page shows both runs and, on the
rows of the params and metrics that differ, each run's own value; it saves a screenshot
($LLM_FORGE_SCREENSHOTS, else the test's tmp dir)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.conftest import screenshot, wait_http
from tests.flows.test_mlflow_ui import free_port, stop

# Two runs of the pipeline that differ in sft's learning rate: name -> (params, metrics). Every metric
# differs between them, and each value prints the same in Python and in the UI (short, exact in binary).
RUNS = {
    "pipeline-lr-1e-4": ({"sft.learning_rate": "0.0001", "sft.epochs": "1"},
                         {"sft.instruction_loss": 2.375, "ppo.reward_score": 0.125, "evaluate.perplexity": 10.75}),
    "pipeline-lr-3e-4": ({"sft.learning_rate": "0.0003", "sft.epochs": "1"},
                         {"sft.instruction_loss": 1.625, "ppo.reward_score": 0.875, "evaluate.perplexity": 5.5}),
}
WAIT_S = 30  # for the page to render; it takes a few seconds


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port with a store in tmp_path; yields its base URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", 120, process)
        yield base
    finally:
        stop(process)


def log_runs(base: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str]]:
    """The project's experiment on `base` (created as the stages create it) with the two RUNS;
    returns (experiment id, run name -> run id)."""
    import mlflow

    from stages.common import tracking

    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    for key, value in tracking.HTTP_DEFAULTS.items():  # setup() sets these: undo them after the test
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    try:
        experiment_id = tracking.setup(root)
        ids = {}
        for name, (params, metrics) in RUNS.items():
            with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                                  tags={"llm_forge.stage": "pipeline"}) as run:
                mlflow.log_params(params)
                mlflow.log_metrics(metrics)
                ids[name] = run.info.run_id
    finally:
        mlflow.set_tracking_uri(before)  # the next test's MLflow is not this server
    return experiment_id, ids


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    # The UI's own link (Routes.getCompareRunPageRoute in mlflow/server/js): JSON lists in the hash route.
    return f"{base}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"


def test_compare_view_shows_both_runs_and_their_metrics(server: str, browser, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id, ids = log_runs(server, tmp_path, monkeypatch)
    browser.set_window_size(1600, 2200)  # tall enough that the screenshot holds the metrics table
    browser.get(compare_url(server, experiment_id, list(ids.values())))

    def table_row(label: str) -> list[str]:
        """A row of the compare tables (run details, params): its label, then one cell per run."""
        return [c.text.strip() for c in browser.find_elements(By.XPATH, f"//tr[th[normalize-space()='{label}']]/*")]

    def metric_rows() -> dict[str, list[str]]:
        """The metrics section: two grids after its switch, the metric names and the values row by row."""
        switch = "//button[@aria-label='Metrics - Show diff only']"
        names, values = ([c.text.strip() for c in browser.find_elements(
            By.XPATH, f"({switch}/following::div[@role='grid'])[{i}]/div[@role='rowgroup']/div")] for i in (1, 2))
        width = len(values) // max(len(names), 1)
        return {name: values[i * width:(i + 1) * width] for i, name in enumerate(names)}

    def rendered(_: object) -> bool:
        return len(table_row("Run Name:")) == 3 and len(metric_rows()) == 3

    try:
        WebDriverWait(browser, WAIT_S).until(rendered)
    except TimeoutException:
        pytest.fail(f"the compare view did not show the two runs and their metrics within {WAIT_S} s; it shows:\n"
                    f"{browser.find_element(By.TAG_NAME, 'body').text[:3000]}")
    finally:
        screenshot(browser, "mlflow-compare-runs")

    # the columns are the two runs, by name; each differing param and metric shows each run's own value
    _, *columns = table_row("Run Name:")
    assert sorted(columns) == sorted(RUNS), columns
    assert table_row("sft.learning_rate") == ["sft.learning_rate", *(RUNS[c][0]["sft.learning_rate"] for c in columns)]
    metrics = metric_rows()
    assert metrics == {key: [str(RUNS[c][1][key]) for c in columns] for key in RUNS[columns[0]][1]}
