"""The one MLflow helper every stage uses.

One run per stage, named after the stage, nested under the pipeline's parent run when a flow
exported its id in `LLM_FORGE_PARENT_RUN_ID`. Each run carries the stage's params section,
its metrics, the files of its report folder as artifacts, the git commit, and the DVC hashes
of the stage's dependencies and outputs (as DVC computes them, so they match `dvc.lock`).

The store comes from `MLFLOW_TRACKING_URI`; the default is a SQLite file in the project
(`sqlite:///mlflow.db`, artifacts under `mlartifacts/`) so that nothing has to be started.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARENT_ENV = "LLM_FORGE_PARENT_RUN_ID"
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "llm-forge")

log = logging.getLogger(__name__)


def setup(root: Path = Path(".")) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    root = root.resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    return exp.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c -> value` pairs (values cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit(root: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def dvc_hashes(stage: str, root: Path = Path(".")) -> dict[str, str]:
    """`dvc.<deps|outs>.<path>` -> md5 of this stage's dependencies and outputs as DVC sees them
    now; empty outside a DVC project or for a stage that `dvc.yaml` does not name."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            found = [s for s in repo.index.stages if getattr(s, "name", None) == stage]
            if not found:
                return {}
            tags = {}
            for kind, items in (("deps", found[0].deps), ("outs", found[0].outs)):
                for item in items:
                    if not item.exists:
                        continue
                    info = item.get_hash()
                    tags[f"dvc.{kind}.{item.def_path}"] = info.value or ""
            return tags
    except Exception as err:  # lineage is best effort: never fail a finished stage over it
        log.warning("could not read DVC hashes for %s: %s", stage, err)
        return {}


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], root: Path = Path(".")) -> Iterator[Any]:
    """An MLflow run for `stage`; nested under the flow's parent run when there is one."""
    import mlflow

    experiment_id = setup(root)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"llm_forge.stage": stage}
    commit = git_commit(root)
    if commit:
        tags["git.commit"] = commit
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                          nested=parent is not None, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def log_stage_result(stage: str, metrics: Mapping[str, Any], report_dir: Path, root: Path = Path(".")) -> None:
    """Metrics (numeric leaves, flattened), the report folder as artifacts, and DVC hashes."""
    import mlflow

    numeric = flatten_numbers(metrics)
    if numeric:
        mlflow.log_metrics(numeric)
    log_report(stage, report_dir)
    hashes = dvc_hashes(stage, root)
    if hashes:
        mlflow.set_tags(hashes)


def log_report(stage: str, report_dir: Path) -> None:
    import mlflow

    if Path(report_dir).is_dir():
        mlflow.log_artifacts(str(report_dir), artifact_path=stage)


def fail() -> None:
    """Mark the active run failed (the stage stopped on bad input, not on a crash)."""
    import mlflow

    mlflow.set_tag("llm_forge.failed", "true")
    run = mlflow.active_run()
    if run is not None:
        mlflow.end_run(status="FAILED")


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_metric_key(name)] = float(value)
    return out


def _metric_key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space; reasons can hold other characters.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)
