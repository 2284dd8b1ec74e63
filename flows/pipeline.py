"""The pipeline flow: every `dvc.yaml` stage, in graph order, under one parent MLflow run.

The flow holds no training or data logic and no stage list: it reads the graph from `dvc.yaml`
and runs each stage with `dvc repro --single-item <stage>`, so DVC alone decides what is up to
date (an unchanged stage is skipped, and its cache is the only cache). Prefect adds retries,
logs and the run history; MLflow gets one parent run that every stage's run nests under.

    python -m flows.pipeline [--stage tokenize]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# The flow starts a temporary local Prefect server; its first start migrates a fresh database,
# which takes longer than Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402

from stages.common import tracking  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def dvc_command() -> list[str]:
    # The dvc of this interpreter's environment, so the stages' `python` is this one too.
    return [sys.executable, "-m", "dvc"]


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    return env


def stage_order(target: str | None = None, root: Path = ROOT) -> list[str]:
    """Stage names of `dvc.yaml` in dependency order (only `target` and its upstream if given)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = {s.addressing: s for s in graph.nodes}
        order = [s.addressing for s in reversed(list(nx.topological_sort(graph)))]
        if target is not None:
            if target not in stages:
                raise SystemExit(f"no stage '{target}' in dvc.yaml (stages: {', '.join(sorted(stages))})")
            keep = {s.addressing for s in nx.descendants(graph, stages[target])} | {target}
            order = [name for name in order if name in keep]
    return order


@task(name="dvc-repro", retries=1, retry_delay_seconds=5, task_run_name="{stage}")
def repro(stage: str, parent_run_id: str | None) -> None:
    logger = get_run_logger()
    logger.info("dvc repro --single-item %s", stage)
    done = subprocess.run([*dvc_command(), "repro", "--single-item", stage], cwd=ROOT, env=stage_env(parent_run_id))
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}): see its error above")


@flow(name="llm-forge-pipeline", log_prints=True)
def pipeline(target: str | None = None) -> list[str]:
    """Run the DVC pipeline up to `target` (all stages by default); returns the stages run."""
    import mlflow

    order = stage_order(target)
    experiment_id = tracking.setup(ROOT)
    commit = tracking.git_commit(ROOT)
    tags = {"llm_forge.stage": "pipeline", **({"git.commit": commit} if commit else {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline", tags=tags) as parent:
        mlflow.log_param("stages", ",".join(order))
        for stage in order:
            repro(stage, parent.info.run_id)
    return order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", help="run only this stage and what it depends on")
    args = ap.parse_args(argv)
    pipeline(args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
