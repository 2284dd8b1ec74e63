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

One pipeline run per project at a time: the flow holds a lock file (`.dvc/tmp/llm-forge.lock`)
from before the first stage to after the last; a second run stops with one sentence naming the
run that holds it (exit code 3), before it writes anything. A stage is retried once when it
failed in a way that can pass (a crash, a kill, a tracking server that dropped a call), never
when it exited with a bad-input error (exit code 2: the same input fails the same way). The run
publishes Prefect artifacts: the evaluation table and the links to its MLflow runs.

`--params FILE` runs on FILE's values: a whole params file or a profile (only the keys that
differ, like `profiles/tiny.yaml`). They are merged into `params.yaml` before anything runs,
because `params.yaml` is what DVC tracks and every stage reads (`dvc exp run -S` changes it the
same way); `git diff params.yaml` shows what the run used and `git checkout params.yaml` undoes it.

    python -m flows.pipeline [--stage tokenize] [--params FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The flow starts a temporary local Prefect server; its first start migrates a fresh database,
# which takes longer than Prefect's 20 s default on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from stages.common import shards, tracking  # noqa: E402
from stages.common.config import ConfigError, Paths, load_section  # noqa: E402
from stages.common.params_check import check_params  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The stage whose metrics hold the evaluation table (`models`: row -> metric -> value, and
# `stderr` of the same shape).
EVALUATION = "evaluate"
REGISTER = "register"  # its metrics name each registered model's version
BAD_INPUT = 2  # a stage's exit code for bad input (stages.common.runner): rerunning cannot help
LOCK = Path(".dvc/tmp/llm-forge.lock")  # DVC's own scratch folder: never committed


class Busy(RuntimeError):
    """Another pipeline run of this project holds the lock."""


@contextlib.contextmanager
def project_lock(root: Path = ROOT) -> Iterator[None]:
    """Hold the project's pipeline lock, or raise Busy naming who holds it. An OS lock (flock):
    a run that dies, even by kill -9, releases it. A flow command takes it once; what runs
    inside (the pipeline flow inside the retraining flow) does not take it again."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"another pipeline run of this project is running ({holder}, holding {path}): "
                       "this one stops without writing anything") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int) -> None:
        self.stage, self.code = stage, code
        kind = "bad input, not retried" if code == BAD_INPUT else f"exit {code}"
        super().__init__(f"stage {stage} failed ({kind}): see its error above")


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry a stage unless it exited with a bad-input error."""
    err = state.result(raise_on_failure=False)
    return not (isinstance(err, StageFailed) and err.code == BAD_INPUT)


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


class ProgressInPrefect:
    """A data stage's progress lines (`stages.common.shards`: shards done, docs/s, ETA) in the
    Prefect UI: in the task's log, and as a progress artifact of the flow run."""

    LINE = re.compile(rf"{re.escape(shards.log.name)}: {shards.PROGRESS} (?P<what>[\w ]+): "
                      r"(?P<done>\d+)/(?P<total>\d+) shards(?P<rest>.*)")

    def __init__(self, stage: str, logger: Any) -> None:
        self.stage, self.logger = stage, logger
        self.artifact: Any = None  # the artifact's id, once created

    def read(self, line: str) -> None:
        found = self.LINE.search(line)
        if not found:
            return
        what, done, total = found["what"], int(found["done"]), int(found["total"])
        said = f"{what}: {done}/{total} shards{found['rest']}"
        self.logger.info(said)
        percent = 100.0 * done / max(total, 1)
        try:
            if self.artifact is None:
                self.artifact = create_progress_artifact(percent, key=f"progress-{self.stage}", description=said)
            else:
                update_progress_artifact(self.artifact, percent, description=said)
        except Exception as err:  # the UI is a view: a failed update must not fail the stage
            self.logger.warning("progress not shown in the UI: %s", err)


def dvc_repro(stage: str, cwd: Path, env: dict[str, str], force: bool, keep: int) -> tuple[int, str]:
    """`dvc repro [--force] --single-item <stage>` in `cwd`, inside a Prefect task: its stderr passes
    through as it comes (a data stage's progress lines also to the Prefect UI); returns its exit code
    and its last `keep` lines of stderr."""
    logger = get_run_logger()
    flags = ["--force"] if force else []
    logger.info("dvc repro %s", " ".join([*flags, "--single-item", stage]))
    with subprocess.Popen([*dvc_command(), "repro", *flags, "--single-item", stage], cwd=cwd, env=env,
                          stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        tail: list[str] = []
        shown = ProgressInPrefect(stage, logger)
        for line in proc.stderr or ():
            sys.stderr.write(line)
            shown.read(line)
            tail = [*tail[-(keep - 1):], line]
    return proc.returncode, "".join(tail)


@task(name="dvc-repro", retries=1, retry_delay_seconds=5, retry_condition_fn=transient, task_run_name="{stage}")
def repro(stage: str, parent_run_id: str | None, force: bool = False) -> None:
    # DVC exits 255 whatever the stage's command exited with, and names that code in its last
    # error line: its tail is kept to read the code from.
    code, tail = dvc_repro(stage, ROOT, stage_env(parent_run_id), force, keep=20)
    if code != 0:
        codes = re.findall(r"exited with (-?\d+)", tail)
        raise StageFailed(stage, int(codes[-1]) if codes else code)


def prepare(params_file: Path | None = None, root: Path = ROOT) -> dict[str, Any]:
    """What a flow command does once before anything runs (under the project lock, for one that
    runs stages): merge `params_file` into params.yaml (when given), check the whole file against
    every stage's config (a ConfigError naming each problem) and return it as read."""
    if params_file:
        use_params(params_file, root)
    return check_params(root / "params.yaml", root / "dvc.yaml", root)


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


def log_headline(stages: Iterable[str], params: Mapping[str, Any], root: Path = ROOT,
                 logger: Any = None) -> dict[str, float]:
    """Log `headline(stages)` to the active MLflow run; returns what it logged. Never raises: the
    figures are a summary of what the stages' runs already hold."""
    import logging

    import mlflow

    if mlflow.active_run() is None:  # logging now would open a run of its own
        return {}
    try:
        paths = load_section(Paths, "paths", dict(params))
        paths = paths.model_copy(update={"reports": root / paths.reports})
        figures = headline(stages, paths)
        if figures:
            mlflow.log_metrics(figures)
        table = paths.report_dir(EVALUATION)
        if EVALUATION in stages:  # the table and chart open on the pipeline run itself
            for name in ("table.md", "chart.png"):
                if (table / name).is_file():
                    mlflow.log_artifact(str(table / name), artifact_path=EVALUATION)
        if REGISTER in stages:  # which registry versions this pipeline made or pointed at
            registered = json.loads((paths.report_dir(REGISTER) / "metrics.json").read_text()).get("registered", {})
            mlflow.set_tags({f"registered.{name}": f"version {r['version']}" for name, r in registered.items()})
        return figures
    except Exception as err:
        (logger or logging.getLogger(__name__)).warning("the pipeline run got no headline figures: %s",
                                                        tracking.describe(err))
        return {}


def run_link(experiment_id: str, run_id: str) -> str:
    """Where a run opens in the MLflow UI: the tracking server's own page, or `make ui`'s for the
    project's local store (the default port; the Makefile's UI_PORT changes it)."""
    from urllib.parse import urlsplit

    uri = tracking.tracking_uri_shown()
    base = uri.rstrip("/") if urlsplit(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def publish_artifacts(done: list[str], params: Mapping[str, Any], experiment_id: str | None, parent_id: str | None,
                      logger: Any) -> None:
    """Prefect artifacts of a pipeline run: the evaluation table (when evaluate ran) and the links
    to its MLflow runs. Never raises: they show what the stages already wrote."""
    from prefect.artifacts import create_markdown_artifact

    try:
        paths = load_section(Paths, "paths", dict(params))
        table = ROOT / paths.reports / EVALUATION / "table.md"
        if EVALUATION in done and table.is_file():
            from stages.common.tables import with_chart

            create_markdown_artifact(key="evaluation", markdown=with_chart(table, table.with_name("chart.png")),
                                     description="The evaluation table and chart of this pipeline run")
        if parent_id and experiment_id:
            import mlflow

            runs = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                      output_format="list")
            lines = [f"- [pipeline]({run_link(experiment_id, parent_id)}) (parent run `{parent_id}`)"]
            lines += [f"- [{r.info.run_name}]({run_link(experiment_id, r.info.run_id)})"
                      for r in sorted(runs, key=lambda r: r.info.start_time or 0)]
            local = not tracking.tracking_uri_shown().startswith(("http://", "https://"))
            note = "\n\nThe project's local store: `make ui` serves these pages." if local else ""
            create_markdown_artifact(key="mlflow-runs", markdown="## MLflow runs\n\n" + "\n".join(lines) + note,
                                     description="This pipeline run in MLflow")
    except Exception as err:
        logger.warning("the run's Prefect artifacts were not published: %s", tracking.describe(err))


@dataclass
class PipelineRun:
    stages: list[str]
    """The stages run, in order."""
    parent_run_id: str | None
    """The MLflow parent run (None: the tracking store was unreachable)."""
    experiment_id: str | None


@flow(name="llm-forge-pipeline", log_prints=True)
def pipeline(params: dict[str, Any], target: str | None = None) -> PipelineRun:
    """Run the DVC pipeline up to `target` (all stages by default) on `params`, the params file as
    `prepare` checked it: the command that calls this holds the project lock."""
    import mlflow

    order = stage_order(target)
    logger = get_run_logger()
    commit = tracking.git_commit(ROOT)
    tags = {"llm_forge.stage": "pipeline", **({"git.commit": commit} if commit else {})}
    parent_id = experiment_id = None
    try:
        experiment_id = tracking.setup(ROOT)
        parent_id = mlflow.start_run(experiment_id=experiment_id, run_name="pipeline", tags=tags).info.run_id
        # the whole params file, so that two pipeline runs compare param by param in the UI
        mlflow.log_params({"stages": ",".join(order), **tracking.flatten(params)})
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
            log_headline(done, params, ROOT, logger)
            try:
                mlflow.end_run(status=status)
            except Exception as err:
                logger.warning("MLflow at %s is unreachable (%s): the pipeline run stays open there",
                               tracking.tracking_uri_shown(), tracking.describe(err))
        publish_artifacts(done, params, experiment_id, parent_id, logger)
    return PipelineRun(order, parent_id, experiment_id)


def use_params(path: Path, root: Path = ROOT) -> None:
    """Merge `path` (a params file or a profile) into the project's params.yaml."""
    from stages.common.profile import apply

    target = root / "params.yaml"
    if path.resolve() != target.resolve():
        apply(path, target, target)
        print(f"params.yaml now holds {path}'s values (`git diff params.yaml` shows them)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", help="run only this stage and what it depends on")
    ap.add_argument("--params", type=Path, help="run on this params file's values (merged into params.yaml)")
    args = ap.parse_args(argv)

    def run() -> None:
        # before Prefect starts: a busy project or a bad params file costs a second, not a server start
        with project_lock():
            pipeline(prepare(args.params), args.stage)

    return exit_code(run)


def exit_code(command: Callable[[], Any]) -> int:
    """Run a flow's command line: 0, or one sentence on stderr and the code of what stopped it:
    3 another run holds the project, 2 a bad params file, 1 a stage failed (its own error is
    above; Prefect has logged the run as failed)."""
    try:
        command()
    except (Busy, ConfigError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3 if isinstance(err, Busy) else 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
