"""The pipeline flow: every `dvc.yaml` stage, in graph order, under one parent MLflow run.

The flow holds no training or data logic and no stage list: it reads the graph from `dvc.yaml`
and runs each stage with `dvc repro --single-item <stage>`, so DVC alone decides what is up to
date (an unchanged stage is skipped, and its cache is the only cache). Prefect adds retries,
logs and the run history; MLflow gets one parent run that every stage's run nests under, and
when the pipeline ends the parent run gets the headline figures (each model's evaluation row,
each stage's top-level metrics), so two pipeline runs compare side by side in the MLflow UI.
Before any stage runs, the whole params file is checked against every stage's typed config, and
every problem is named at once (exit code 2). A tracking server that cannot be reached does not
stop the pipeline: each stage keeps what it could not send (see `stages.common.tracking`).

    python -m flows.pipeline [--stage tokenize]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The flow starts a temporary local Prefect server; its first start migrates a fresh database,
# which takes longer than Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402

from stages.common import tracking  # noqa: E402
from stages.common.config import ConfigError, Paths, check_params, load_section, read_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The stage whose metrics hold the evaluation table (`models`: row -> metric -> value, and
# `stderr` of the same shape).
EVALUATION = "evaluate"


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


def check(root: Path = ROOT) -> None:
    """The whole params file against every stage's config: a ConfigError naming each problem."""
    check_params(root / "params.yaml", root / "dvc.yaml", root)


def evaluation_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation table as MLflow metrics: `<row>.<metric>` for each model's score and
    `<row>.<metric>.stderr` for its standard error (row names such as `quantized/nf4` keep their
    slash, which MLflow allows)."""
    out: dict[str, float] = {}
    for key, suffix in (("models", ""), ("stderr", ".stderr")):
        rows = table.get(key)  # a table written before standard errors existed has none
        if not isinstance(rows, Mapping):
            continue
        for row, scores in rows.items():
            if isinstance(scores, Mapping):
                out.update({tracking.metric_key(f"{row}.{metric}{suffix}"): float(value)
                            for metric, value in scores.items() if _number(value)})
    return out


def headline(stages: Iterable[str], paths: Paths) -> dict[str, float]:
    """What the parent run shows of the stages that ran: each stage's top-level numbers as
    `<stage>.<key>` (nested ones stay on the stage's own run) and the evaluation table's rows.
    A stage without a readable `metrics.json` adds nothing."""
    out: dict[str, float] = {}
    for stage in stages:
        try:
            metrics = json.loads((paths.report_dir(stage) / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metrics, Mapping):
            continue
        out.update({tracking.metric_key(f"{stage}.{key}"): float(value)
                    for key, value in metrics.items() if _number(value)})
        if stage == EVALUATION:
            # the table is the headline: a row's name wins over a stage key spelt the same
            out.update(evaluation_metrics(metrics))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_headline(stages: Iterable[str], root: Path = ROOT, logger: Any = None) -> dict[str, float]:
    """Log `headline(stages)` to the active MLflow run; returns what it logged. Never raises: the
    figures are a summary of what the stages' runs already hold."""
    import logging

    import mlflow

    if mlflow.active_run() is None:  # logging now would open a run of its own
        return {}
    try:
        paths = load_section(Paths, "paths", read_yaml(root / "params.yaml"))
        paths = paths.model_copy(update={"reports": root / paths.reports})
        figures = headline(stages, paths)
        if figures:
            mlflow.log_metrics(figures)
        return figures
    except Exception as err:
        (logger or logging.getLogger(__name__)).warning("the pipeline run got no headline figures: %s",
                                                        tracking.describe(err))
        return {}


@flow(name="llm-forge-pipeline", log_prints=True)
def pipeline(target: str | None = None) -> list[str]:
    """Run the DVC pipeline up to `target` (all stages by default); returns the stages run."""
    import mlflow

    check()
    order = stage_order(target)
    logger = get_run_logger()
    commit = tracking.git_commit(ROOT)
    tags = {"llm_forge.stage": "pipeline", **({"git.commit": commit} if commit else {})}
    parent_id = None
    try:
        experiment_id = tracking.setup(ROOT)
        parent_id = mlflow.start_run(experiment_id=experiment_id, run_name="pipeline", tags=tags).info.run_id
        mlflow.log_param("stages", ",".join(order))
    except Exception as err:  # the stages still run, each keeping what it could not send
        logger.warning("MLflow at %s is unreachable (%s): the stages run without a parent run",
                       tracking.tracking_uri_shown(), tracking.describe(err))
    status = "FAILED"
    done: list[str] = []  # the stages whose outputs are now current (a failed run stops early)
    try:
        for stage in order:
            repro(stage, parent_id)
            done.append(stage)
        status = "FINISHED"
    finally:
        if parent_id is not None and mlflow.active_run() is not None:
            log_headline(done, ROOT, logger)
            try:
                mlflow.end_run(status=status)
            except Exception as err:
                logger.warning("MLflow at %s is unreachable (%s): the pipeline run stays open there",
                               tracking.tracking_uri_shown(), tracking.describe(err))
    return order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", help="run only this stage and what it depends on")
    args = ap.parse_args(argv)
    try:
        check()  # before Prefect starts: a bad params file costs a second, not a server start
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pipeline(args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
