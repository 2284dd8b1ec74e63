"""Promise: a stage run that fails leaves the last finished run's reports as they were (its
`metrics.json` above all: what `dvc metrics diff` and the pipeline's summary read), and says where
its own partial reports are. A training stage's rerun continues the curve the failed run drew
(tests/stages/test_sft.py kills sft after a checkpoint and checks the one curve across both runs)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.config import Paths, StageConfig, StageError
from stages.common.runner import run_stage
from tests.conftest import ROOT, project_env

PATH_KEYS = tuple(Paths.model_fields)


class FakeConfig(StageConfig):
    fail: str  # "no", "bad_input" or "crash"


def report_then(cfg: FakeConfig, paths: Paths) -> dict:
    """A stage that writes its report, then fails as `cfg.fail` says."""
    report = paths.report_dir("fake")
    (report / "table.md").write_text(f"written by a run that fails: {cfg.fail}\n")
    if cfg.fail == "bad_input":
        raise StageError("fake.input: row 3 has no text")
    if cfg.fail == "crash":
        raise RuntimeError("the stage crashed")
    return {"docs_in": 2, "docs_out": 2, "dropped": {}}


def run_fake(project: Path, fail: str) -> int:
    params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "fake": {"fail": fail}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return run_stage("fake", FakeConfig, report_then, ["--no-mlflow"])


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fail", ["bad_input", "crash"])
def test_a_failed_run_keeps_the_last_reports_and_names_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture,
                                                               caplog: pytest.LogCaptureFixture, fail: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_fake(tmp_path, "no") == 0
    report = tmp_path / "out/reports/fake"
    finished = files(report)
    assert json.loads(finished["metrics.json"])["docs_out"] == 2 and "table.md" in finished
    assert not report.with_name(".fake.partial").exists()  # no partial folder after a finished run

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llm_forge"):
        if fail == "crash":
            with pytest.raises(RuntimeError, match="the stage crashed"):
                run_fake(tmp_path, fail)
        else:
            assert run_fake(tmp_path, fail) == 2
    assert files(report) == finished  # the last finished run's reports, metrics.json included
    partial = report.with_name(".fake.partial")
    assert files(partial)["table.md"] == f"written by a run that fails: {fail}\n"
    assert "metrics.json" not in files(partial)
    (said,) = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert said == ("fake did not finish: its reports so far are in out/reports/.fake.partial/; "
                    "out/reports/fake/ keeps the last finished run's")
    if fail == "bad_input":  # the error is still the one sentence, last on stderr
        assert capsys.readouterr().err.strip().splitlines()[-1] == "error: fake: fake.input: row 3 has no text"

    # the next run that finishes replaces the reports, and the partial folder is gone
    assert run_fake(tmp_path, "no") == 0
    assert files(report)["table.md"] == "written by a run that fails: no\n"
    assert not partial.exists()


def test_bad_input_found_before_any_report_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cfg: FakeConfig, paths: Paths) -> dict:
        raise StageError("fake.input: the file data/in.jsonl does not exist")

    monkeypatch.chdir(tmp_path)
    params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "fake": {"fail": "bad_input"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("fake", FakeConfig, refuse, ["--no-mlflow"]) == 2
    assert not (tmp_path / "out/reports").exists() or not any((tmp_path / "out/reports").iterdir())


# The fake stage as a DVC stage: `dvc repro` deletes its declared outputs before running it.
DVC_STAGE = """
import sys
sys.path.insert(0, {root!r})
from tests.reliability.test_reports import FakeConfig, report_then
from stages.common.runner import run_stage
sys.exit(run_stage("fake", FakeConfig, report_then, ["--no-mlflow"]))
"""
DVC_YAML = """
stages:
  fake:
    cmd: python fake.py
    deps: [fake.py]
    params: [fake]
    metrics:
      - out/reports/fake/metrics.json:
          cache: false
"""


def test_under_dvc_repro_a_failed_run_keeps_the_last_metrics(tmp_path: Path) -> None:
    (tmp_path / "fake.py").write_text(DVC_STAGE.format(root=str(ROOT)))
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)

    def repro(fail: str) -> subprocess.CompletedProcess:
        params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "fake": {"fail": fail}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=project_env(tmp_path),
                              capture_output=True, text=True, timeout=300)

    assert subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path).returncode == 0
    assert repro("no").returncode == 0, "first run"
    metrics = tmp_path / "out/reports/fake/metrics.json"
    finished = metrics.read_text()
    failed = repro("bad_input")
    assert failed.returncode != 0
    assert metrics.read_text() == finished  # DVC deleted it before the run; it is back
    assert "out/reports/.fake.partial/" in failed.stderr
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    (workspace,) = json.loads(shown.stdout).values()  # without git, the workspace is the one revision
    assert workspace["data"]["out/reports/fake/metrics.json"]["data"]["docs_out"] == 2
