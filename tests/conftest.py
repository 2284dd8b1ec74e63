"""Shared fixtures: a scratch copy of the project on the tiny profile, and a Paths in tmp_path."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers on a 2-core machine: torch's default of a thread per
# core puts four OpenMP threads, spinning while they wait, on two cores, and the tiny models gain
# nothing from a second thread (BENCHMARKS.md: "One thread per test process"). Set before torch
# is imported here, so this process and every stage, flow and server a test starts run one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from stages.common.config import Paths, config_class, load_section, overlay, read_yaml
from stages.common.profile import apply
from stages.common.runner import run_in_process

ROOT = Path(__file__).resolve().parent.parent
# What a scratch project needs of this one: code, graph, params, profiles.
PROJECT_FILES = ("stages", "flows", "configs", "dvc.yaml", "params.yaml", "profiles", ".dvcignore")
# Credentials a user's environment carries (hub token, tracking-server login, S3 keys): every
# scratch project runs with these planted, so a test can search all its outputs for them
# (tests/reliability/test_secrets.py). Nothing in a test run can use them: there is no network.
# (MLFLOW_TRACKING_USERNAME is left out: a user name is no secret, MLflow records it as `mlflow.user`.)
CANARIES = {
    "HF_TOKEN": "hf_CanaryHubTokenQ9cX7kLm2Pq4Rs6Tu8Vw",
    "HUGGING_FACE_HUB_TOKEN": "hf_CanaryHubLegacyQ9cA1bC3dE5fG7hJ9",
    "MLFLOW_TRACKING_PASSWORD": "CanaryMlflowPasswordQ9cZ8yX6wV4",
    "MLFLOW_TRACKING_TOKEN": "CanaryMlflowTokenQ9cU2tS4rQ6pO8",
    "AWS_ACCESS_KEY_ID": "AKIACANARYQ9C7XK2LMP",
    "AWS_SECRET_ACCESS_KEY": "CanaryAwsSecretQ9c/Kx7Lm2Pq4Rs6Tu8Vw0Yz3Ab",
}


@functools.cache
def tiny_params() -> dict:
    """params.yaml with profiles/tiny.yaml applied: the values every test starts from."""
    return overlay(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "profiles/tiny.yaml"))


def tiny_config(section: str, cls: type | None = None, **changes: object) -> object:
    """The tiny profile's `section` as its typed config, with `changes` merged in the way a
    profile is (a key the section lacks is an error), so a test states only what it changes."""
    raw = overlay(tiny_params()[section] or {}, changes, section)
    return load_section(cls or config_class(section), section, {section: raw})


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Every stage folder inside tmp_path."""
    return Paths(raw=tmp_path / "data/raw", clean=tmp_path / "data/clean", quarantine=tmp_path / "data/quarantine",
                 decontam=tmp_path / "data/decontam", contaminated=tmp_path / "data/contaminated",
                 dedup=tmp_path / "data/dedup", base=tmp_path / "models/base", tokenized=tmp_path / "data/tokenized",
                 pretrain=tmp_path / "models/pretrain", sft=tmp_path / "models/sft",
                 reward=tmp_path / "models/reward", judge=tmp_path / "models/judge",
                 reference=tmp_path / "data/reference", ppo=tmp_path / "models/ppo", dpo=tmp_path / "models/dpo",
                 quantized=tmp_path / "models/quantized", reports=tmp_path / "reports", gate=tmp_path / "models/gate")


def make_project(dest: Path, profile: str = "tiny", git: bool = False) -> Path:
    """A copy of the project at `dest` with `profiles/<profile>.yaml` applied, as a DVC project
    of its own, sharing this checkout's extracted assets. `git`: also a git repository whose one
    commit holds it all (profile applied), as a user commits before `make run`; else no git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    apply(dest / "profiles" / f"{profile}.yaml", dest / "params.yaml", dest / "params.yaml")
    if not git:
        run_in(dest, "-m", "dvc", "init", "--no-scm", "-q")
        dvc_config(dest)
        return dest
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    git_in(dest, "init", "-q")
    # the assets are `make setup`'s (ignored as a folder by .gitignore); here they are a link
    (dest / ".git" / "info" / "exclude").write_text("/assets\n")
    run_in(dest, "-m", "dvc", "init", "-q")
    dvc_config(dest)
    git_in(dest, "add", "-A")
    git_in(dest, "commit", "-q", "-m", f"llm-forge on the {profile} profile")
    return dest


def dvc_config(dest: Path) -> None:
    """The project's own DVC settings (`.dvc/config`) merged into a scratch project's, as a clone has
    them: without them every `dvc` command would also start DVC's analytics process (about a CPU
    second each)."""
    from dvc.config import Config

    ours = Config(dvc_dir=str(ROOT / ".dvc"), validate=False).load_one("repo")
    with Config(dvc_dir=str(dest / ".dvc"), validate=False).edit("repo") as config:
        for section, values in ours.items():
            config[section] = {**config.get(section, {}), **values}


def git_in(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`git *args` in `project` (a test's own identity for commits); fails the test on error."""
    done = subprocess.run(["git", "-c", "user.name=llm-forge tests", "-c", "user.email=tests@llm-forge.invalid",
                           *args], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"`git {' '.join(args)}` exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("LLM_FORGE_PARENT_RUN_ID", None)
    env.update(CANARIES)
    return env


def run_in(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python *args` in `project`, output captured; fails the test with the output on error."""
    done = subprocess.run([sys.executable, *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        pytest.fail(f"`python {' '.join(args)}` exited {done.returncode}:\n"
                    f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile run once end to end through the Prefect flow (which runs each stage
    with `dvc repro`), shared by the integration tests. A git repository whose commit holds the
    code and params that ran, so its registered models record a commit and a clean tree."""
    project = make_project(tmp_path_factory.mktemp("tiny") / "project", git=True)
    done = run_in(project, "-m", "flows.pipeline")
    # the flow's own output, kept so that tests can search it too (test_secrets.py)
    (project.parent / "flow.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    return project


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """What the training stages read, made once by the real data stages on the tiny profile
    (in-process, no MLflow): data/dedup, models/base (random init), data/tokenized and what
    else the graph makes on the way (validate's verdict).
    Tests copy what they change (see `tiny_workdir`)."""
    from flows.pipeline import stage_order

    root = tmp_path_factory.mktemp("tiny_inputs")
    apply(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml", root / "params.yaml")
    params = read_yaml(root / "params.yaml")
    paths = Paths(**{k: root / v for k, v in params["paths"].items()})
    # tokenize and what it depends on, from dvc.yaml
    run_in_process(stage_order("tokenize", ROOT), params, paths, cwd=ROOT)
    return paths


def tiny_model(paths: Paths, dest: Path) -> Path:
    """A causal LM folder at `dest`: the tiny random-init base with the tiny tokenizer beside it,
    standing in for a trained model (pretrain, sft, ppo) where only its shape matters."""
    dest.mkdir(parents=True)
    for src in (paths.base, paths.tokenized / "tokenizer"):
        for f in src.iterdir():
            if f.is_file() and f.name != "llm_forge.yaml":
                shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture
def tiny_workdir(tiny_inputs: Paths, tmp_path: Path) -> Paths:
    """A private copy of the tiny inputs' folders, so a test may write next to them."""
    for name in ("dedup", "base", "tokenized"):
        src = getattr(tiny_inputs, name)
        shutil.copytree(src, tmp_path / src.relative_to(tiny_inputs.reports.parent))
    return Paths(**{k: tmp_path / Path(v).relative_to(tiny_inputs.reports.parent)
                    for k, v in tiny_inputs.model_dump().items()})


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test` (two pytest-xdist workers, `--dist loadgroup`) the tests that read the
    session's tiny pipeline go to one worker, so that it is built once; every other test goes to
    whichever worker is free. What `pytest.mark.xdist_group` does: xdist 3.8 writes the group into
    `item._nodeid`, which pytest 9.2 no longer reads (it reads `item._id`), so it is written here."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers only
        return
    from _pytest.nodeid import NodeId

    for item in items:
        if "tiny_project" in getattr(item, "fixturenames", ()) and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@tiny_project")
