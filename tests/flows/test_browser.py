"""Promise: the MLflow UI shows a new user the work, in a real browser (headless Chromium).

- The address `make ui` prints, opened as printed, shows the tiny pipeline's run with its stage
  runs nested under it (the training runs, not the GenAI traces page); the registered version's
  page reads its lineage in a few lines.
- The compare view of two pipeline runs (logged through `mlflow server`, the flags `make ui` uses)
  shows both runs and, on the rows of the params and metrics that differ, each run's own value.

Each test saves a screenshot ($LLM_FORGE_SCREENSHOTS, else the test's tmp dir)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.conftest import free_port, screenshot, stop, wait_http
from tests.flows.test_mlflow_ui import make_ui

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


# --- what `make ui` opens on, over the tiny pipeline's own store -------------------------------

STAGES_WAIT_S = 60  # the runs table of a store with fifteen runs, on a busy machine


@pytest.fixture(scope="module")
def ui(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make ui` in the tiny project that ran; yields the address it printed."""
    server, address = make_ui(tiny_project, free_port(), tmp_path_factory.mktemp("ui") / "ui.out")
    try:
        yield address
    finally:
        stop(server)


def run_names(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    cells = browser.find_elements(By.XPATH, "//div[@role='gridcell' and @col-id='attributes.`Run Name`']")
    return [c.text.strip().splitlines()[-1] for c in cells if c.text.strip()]  # after the run's colour label


def test_make_ui_opens_on_the_pipeline_run_and_its_stage_runs(ui: str, tiny_project: Path, browser) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flows.pipeline import stage_order

    browser.get(ui)  # exactly what `make ui` printed
    try:
        WebDriverWait(browser, STAGES_WAIT_S).until(lambda b: run_names(b) == ["pipeline"])
        # the stage runs are nested under the pipeline run: its row opens on them
        pipeline_cell = browser.find_element(By.XPATH, "//div[@role='gridcell' and @col-id='attributes.`Run Name`']")
        pipeline_cell.find_element(By.XPATH, ".//button").click()
        stages = [s.rpartition(":")[2] for s in stage_order(None, tiny_project)]  # `dvc.yaml:name` from elsewhere
        WebDriverWait(browser, STAGES_WAIT_S).until(lambda b: len(run_names(b)) == 1 + len(stages))
    except TimeoutException:
        pytest.fail(f"the runs table did not show the pipeline and its stage runs within {STAGES_WAIT_S} s; it shows "
                    f"{run_names(browser)}:\n{browser.find_element(By.TAG_NAME, 'body').text[:2000]}")
    finally:
        screenshot(browser, "mlflow-training-runs")
    names = run_names(browser)
    assert names[0] == "pipeline" and sorted(names[1:]) == sorted(stages), names
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f"{1 + len(stages)} matching runs" in body
    assert "Evaluation runs" not in body  # the model-training side of the UI, not the GenAI one


def test_the_registered_versions_page_reads_its_lineage_in_a_few_lines(ui: str, tiny_project: Path,
                                                                       browser) -> None:
    import mlflow
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    version = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlflow.db'}") \
        .get_model_version_by_alias("llm-forge", "candidate").version
    browser.get(f"{ui.partition('/#/')[0]}/#/models/llm-forge/versions/{version}")

    def tags(b) -> list[str]:
        rows = b.find_elements(By.XPATH, "//table/tbody/tr")
        return [r.text.strip() for r in rows if r.text.strip()]

    def source_run(b) -> str:
        """The page's "Source Run" field: blank until the UI has fetched the run, after the tags."""
        return b.find_element(By.TAG_NAME, "body").text.partition("Source Run")[2].partition("Source Model")[0]

    try:
        WebDriverWait(browser, STAGES_WAIT_S).until(lambda b: f"Version {version}" in b.find_element(
            By.TAG_NAME, "body").text and tags(b) and "register" in source_run(b))
    except TimeoutException:
        pytest.fail(f"the version page did not show its tags and its source run within {STAGES_WAIT_S} s")
    finally:
        screenshot(browser, "mlflow-model-version")
    # the run that made it, one click away: the wait above fails the test when it never shows
    shown = tags(browser)
    # the record a person reads (issue 22): commit, clean tree, the three digests, the verdict and
    # the folder with its hash, not one row per dvc.lock hash upstream
    assert len(shown) <= 10, f"{len(shown)} tag rows: {shown[:12]}"
    names = {row.split("\n")[0] for row in shown}
    assert {"git.commit", "git.clean", "params.md5", "dvc.lock.md5", "data.md5", "eval.verdict"} <= names, names
