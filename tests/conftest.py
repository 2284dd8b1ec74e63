"""Shared fixtures: a scratch copy of the project on the tiny profile, and a Paths in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.config import Paths
from stages.common.profile import apply

ROOT = Path(__file__).resolve().parent.parent
# What a scratch project needs of this one: code, graph, params, profiles.
PROJECT_FILES = ("stages", "flows", "dvc.yaml", "params.yaml", "profiles", ".dvcignore")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Every stage folder inside tmp_path."""
    return Paths(raw=tmp_path / "data/raw", clean=tmp_path / "data/clean", quarantine=tmp_path / "data/quarantine",
                 dedup=tmp_path / "data/dedup", base=tmp_path / "models/base", tokenized=tmp_path / "data/tokenized",
                 reports=tmp_path / "reports")


def make_project(dest: Path, profile: str = "tiny") -> Path:
    """A copy of the project at `dest` with `profiles/<profile>.yaml` applied, as a DVC project
    of its own (no git), sharing this checkout's extracted assets."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    apply(dest / "profiles" / f"{profile}.yaml", dest / "params.yaml", dest / "params.yaml")
    run_in(dest, "-m", "dvc", "init", "--no-scm", "-q")
    return dest


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env.pop("LLM_FORGE_PARENT_RUN_ID", None)
    return env


def run_in(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python *args` in `project`, output captured; fails the test with the output on error."""
    done = subprocess.run([sys.executable, *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        pytest.fail(f"`python {' '.join(args)}` exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile run once through `dvc repro`, shared by the integration tests."""
    project = make_project(tmp_path_factory.mktemp("tiny") / "project")
    run_in(project, "-m", "dvc", "repro")
    return project
