"""The one MLflow helper every stage uses.

One run per stage, named after the stage, nested under the pipeline's parent run when a flow
exported its id in `LLM_FORGE_PARENT_RUN_ID`. Each run carries the stage's params section,
its metrics, the files of its report folder as artifacts, the git commit, and the DVC hashes
of the stage's dependencies and outputs (as DVC computes them, so they match `dvc.lock`). The
dependencies that another stage writes (data and models, not code) are also logged as the run's
input datasets, named by their path with the DVC hash as digest, so the runs table's Datasets
column shows what each run read and two runs that read the same bytes show the same digest.

A stage run that `dvc exp run` started carries the experiment's name (`dvc.experiment`, the name
`dvc exp show` lists it under) and its baseline commit (`dvc.experiment_baseline`), so MLflow's
runs table and compare view find an experiment by the name DVC gave it.

The experiment is marked as one of training runs (`mlflow.experimentKind`), so the MLflow 3 UI
opens it on its runs table, not on the GenAI traces overview it shows an unmarked experiment.

The store comes from `MLFLOW_TRACKING_URI`; the default is a SQLite file in the project
(`sqlite:///mlflow.db`, artifacts under `mlartifacts/`) so that nothing has to be started.

A tracking server that is down (or goes down mid-stage) never fails a stage: the first call that
fails switches the stage's run to offline, one warning line says so, and everything the run was
to record (params, metrics, tags, the report folder) is kept in `reports/<stage>/mlflow_offline.json`
beside `metrics.json`. Against a server, MLflow's HTTP retries are shortened (unless the
environment sets them) so that this happens in seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARENT_ENV = "LLM_FORGE_PARENT_RUN_ID"
# What `dvc exp run` puts in its stages' environment (dvc.env's names): the experiment's name and
# the commit it is based on; each becomes a tag of the stage's run.
DVC_EXPERIMENT_ENV = {"DVC_EXP_NAME": "dvc.experiment", "DVC_EXP_BASELINE_REV": "dvc.experiment_baseline"}
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "llm-forge")

OFFLINE_FILE = "mlflow_offline.json"
DIGEST_CHARS = 36  # the longest dataset digest an MLflow store keeps
# MLflow retries a failing request for about four minutes by default; a stage waits seconds.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}

# The experiment tag the MLflow 3 UI reads to choose an experiment's first page: without it the
# UI guesses, and shows this project's experiment as a GenAI one (traces, an assistant panel);
# this value is the UI's kind for model training, which opens on the runs table.
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"

log = logging.getLogger(__name__)


def setup(root: Path = Path("."), uri: str | None = None) -> str:
    """Point MLflow at the project's store and experiment (or at the store `uri`); returns the
    experiment id. The experiment is marked as one of training runs unless it already carries a
    kind (a user who chose another kind in the UI keeps it)."""
    import mlflow

    root = root.resolve()
    own = f"sqlite:///{root / 'mlflow.db'}"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or own
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        # Decided by the URI, not by whether the environment names one: `set_tracking_uri` above
        # exports it, and a flow's stages inherit it.
        artifacts = (root / "mlartifacts").as_uri() if uri == own else None
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags={KIND_TAG: KIND})
    if KIND_TAG not in exp.tags:
        try:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        except Exception as err:  # how the UI opens the experiment is no reason to lose a run
            log.warning("could not mark experiment %s as training runs (%s): the MLflow UI may open it "
                        "on its traces page", EXPERIMENT, describe(err))
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


def dvc_hashes(stage: str, root: Path = Path(".")) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, inputs) for this stage as DVC sees it now. tags: `dvc.<deps|outs>.<path>` -> md5 of
    its dependencies and outputs; inputs: path -> md5 of the dependencies that another stage of
    the graph writes (its data and models, not its code). Both empty outside a DVC project or for
    a stage that `dvc.yaml` does not name."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            found = [s for s in repo.index.stages if getattr(s, "name", None) == stage]
            if not found:
                return {}, {}
            written = [out for other in repo.index.stages if other is not found[0] for out in other.outs]
            tags, inputs = {}, {}
            for kind, items in (("deps", found[0].deps), ("outs", found[0].outs)):
                for item in items:
                    if not item.exists:
                        continue
                    info = item.get_hash()
                    tags[f"dvc.{kind}.{item.def_path}"] = info.value or ""
                    if kind == "deps" and info.value and _written_by_a_stage(item, written):
                        inputs[str(item.def_path)] = info.value
            return tags, inputs
    except Exception as err:  # lineage is best effort: never fail a finished stage over it
        log.warning("could not read DVC hashes for %s: %s", stage, err)
        return {}, {}


def _written_by_a_stage(dep: Any, outs: list[Any]) -> bool:
    # a dependency on an output, or on a file inside an output folder
    return any(type(out.fs) is type(dep.fs) and dep.fs.isin_or_eq(dep.fs_path, out.fs_path) for out in outs)


class _Record:
    """What the current stage's run has to record, kept so that it survives the server."""

    def __init__(self, stage: str, params: Mapping[str, Any], report_dir: Path, home: Path) -> None:
        import time
        import uuid

        self.stage, self.report_dir, self.home = stage, Path(report_dir), Path(home)
        self.id = uuid.uuid4().hex  # the replay's key: it sends this record once
        self.params = flatten(params)
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.inputs: dict[str, str] = {}  # input dataset path -> DVC md5
        self.run_id: str | None = None
        self.parent_run_id = os.environ.get(PARENT_ENV) or None
        self.start_ms, self.end_ms = int(time.time() * 1000), None
        self.status = "RUNNING"
        self.error: str | None = None  # set when the run went offline

    def go_offline(self, err: BaseException) -> None:
        first = self.error is None
        self.error = describe(err)
        self.save()
        if first:
            log.warning("MLflow at %s is unreachable (%s): %s goes on, and its params and metrics are "
                        "kept in %s (`python -m stages.common.tracking replay` sends them)", tracking_uri_shown(),
                        self.error, self.stage, self.home / OFFLINE_FILE)

    def end(self, status: str) -> None:
        import time

        self.status, self.end_ms = status, int(time.time() * 1000)
        self.save()

    def save(self) -> None:
        from stages.common.io import write_json

        if self.error is None:
            return
        write_json(self.report_dir / OFFLINE_FILE, {
            "stage": self.stage, "id": self.id, "tracking_uri": tracking_uri_shown(), "error": self.error,
            "experiment": EXPERIMENT, "run_id": self.run_id, "parent_run_id": self.parent_run_id,
            "status": self.status, "start_ms": self.start_ms, "end_ms": self.end_ms, "params": self.params,
            "metrics": self.metrics, "tags": self.tags, "inputs": self.inputs, "artifacts": str(self.home)})


_current: _Record | None = None


# Environment variables whose values are credentials: never written to a log, file or run.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)


def scrub(text: str) -> str:
    """`text` without the user:password of any URL in it and without any credential value the
    environment holds (an error message of the HTTP client quotes the URL it called)."""
    text = _USERINFO.sub(r"\1", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text


def describe(err: BaseException) -> str:
    """An exception as one short line for a log, with credentials scrubbed."""
    first = str(err).splitlines()[0] if str(err) else ""
    return scrub(f"{type(err).__name__}: {first}")[:500]


def tracking_uri_shown() -> str:
    """The tracking URI for logs and files, without any user:password it carries."""
    from urllib.parse import urlsplit, urlunsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # as written: a round trip turns `sqlite:////abs/path` into another path
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _offline() -> bool:
    return _current is not None and _current.error is not None


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any], root: Path = Path("."),
              report_dir: Path | None = None, home: Path | None = None) -> Iterator[Any]:
    """An MLflow run for `stage`; nested under the flow's parent run when there is one. Yields
    the run, or None when the tracking server cannot be reached (the run is kept offline, in
    `report_dir`; `home`: where that folder will be once the stage has finished, if elsewhere)."""
    import mlflow

    global _current
    report_dir = report_dir or Path(root) / "reports" / stage
    record = _Record(stage, params, report_dir, home or report_dir)
    _current = record
    parent = record.parent_run_id
    record.tags = {"llm_forge.stage": stage}
    commit = git_commit(root)
    if commit:
        record.tags["git.commit"] = commit
    record.tags.update({tag: os.environ[env] for env, tag in DVC_EXPERIMENT_ENV.items() if os.environ.get(env)})
    run = None
    try:
        experiment_id = setup(root)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                               nested=parent is not None, tags=record.tags)
        record.run_id = run.info.run_id
        mlflow.log_params(record.params)
    except Exception as err:  # the server is down: the stage still runs
        record.go_offline(err)
    try:
        yield None if _offline() else run
    except BaseException:
        _end(run, "FAILED")
        raise
    else:
        _end(run, "FINISHED")
    finally:
        _current = None


def _end(run: Any, status: str) -> None:
    import mlflow

    if _current is not None and _current.status == "RUNNING":
        _current.end(status)
    if run is None or mlflow.active_run() is None:
        return
    if _offline():
        _drop_active_run()
        return
    try:
        mlflow.end_run(status=status)
    except Exception as err:
        _drop_active_run()
        if _current is not None:
            _current.go_offline(err)


def _drop_active_run() -> None:
    # The run cannot be ended on a server that is gone: forget it locally.
    from mlflow.tracking import fluent

    stack = getattr(fluent, "_active_run_stack", None)
    runs = stack.get() if hasattr(stack, "get") else stack
    if runs:
        runs.pop()


def _attempt(action: Any, *args: Any, **kwargs: Any) -> None:
    """Do one MLflow call unless the run is offline; a failure takes it offline."""
    if _offline():
        return
    try:
        action(*args, **kwargs)
    except Exception as err:
        if _current is None:
            raise
        _current.go_offline(err)


def log_stage_result(stage: str, metrics: Mapping[str, Any], report_dir: Path, root: Path = Path(".")) -> None:
    """Metrics (numeric leaves, flattened), the report folder as artifacts, DVC hashes, and the
    data the stage read as input datasets."""
    import mlflow

    numeric = flatten_numbers(metrics)
    hashes, inputs = dvc_hashes(stage, root)
    if _current is not None:
        _current.metrics.update(numeric)
        _current.tags.update(hashes)
        _current.inputs.update(inputs)
        _current.save()
    if numeric:
        _attempt(mlflow.log_metrics, numeric)
    log_report(stage, report_dir)
    if hashes:
        _attempt(mlflow.set_tags, hashes)
    log_inputs(inputs)


def log_inputs(inputs: Mapping[str, str]) -> None:
    """`path -> md5` as the active run's input datasets (see `input_datasets`)."""
    import mlflow

    datasets = input_datasets(inputs)
    if datasets:  # MLflow wants a context and tags per dataset, even when there are none
        _attempt(mlflow.log_inputs, datasets=datasets, contexts=[None] * len(datasets),
                 tags_list=[None] * len(datasets))


def input_datasets(inputs: Mapping[str, str]) -> list[Any]:
    """Each `path -> md5` as an MLflow dataset that holds no data: its name and source are the path,
    its digest the DVC hash. Empty when they cannot be built (lineage never fails a stage)."""
    import json

    try:
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset

        # MLflow keeps a digest of at most DIGEST_CHARS; a DVC md5 (a folder's ends in `.dir`) fits.
        return [MetaDataset(get_dataset_source_from_json(json.dumps({"uri": path}), "local"), name=path,
                            digest=md5[:DIGEST_CHARS]) for path, md5 in inputs.items()]
    except Exception as err:
        log.warning("could not describe the inputs %s as MLflow datasets: %s", ", ".join(inputs), describe(err))
        return []


def log_report(stage: str, report_dir: Path) -> None:
    import mlflow

    if Path(report_dir).is_dir():
        _attempt(mlflow.log_artifacts, str(report_dir), artifact_path=stage)


def fail() -> None:
    """Mark the active run failed (the stage stopped on bad input, not on a crash)."""
    import mlflow

    if _current is not None:
        _current.tags["llm_forge.failed"] = "true"
        _current.end("FAILED")
    _attempt(mlflow.set_tag, "llm_forge.failed", "true")
    if mlflow.active_run() is not None:
        if _offline():
            _drop_active_run()
        else:
            _attempt(mlflow.end_run, status="FAILED")


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_key(name)] = float(value)
    return out


def metric_key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space; reasons can hold other characters.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# the MLflow UI's address, and the replay of what a stage kept offline

# MLflow 3's UI reads its mode from the address: without this, a fresh browser opens the
# experiment in its GenAI mode (traces), whatever the experiment's kind tag says.
TRAINING_RUNS = "#/experiments/{}/runs?workflowType=machine_learning"


def ui_address(root: Path, base: str) -> str:
    """Where `make ui` (serving the project's own store at `base`) shows the experiment's training
    runs; the experiment is made, as a stage makes it, when no stage has run yet."""
    experiment_id = setup(root, f"sqlite:///{Path(root).resolve() / 'mlflow.db'}")
    return f"{base.rstrip('/')}/{TRAINING_RUNS.format(experiment_id)}"


REPLAYED_TAG = "llm_forge.replayed"  # on a run that a replay completed: the record's id
RECORD_TAG = "llm_forge.offline_record"  # on a run a replay made: the record's id


def offline_records(reports: Path) -> list[Path]:
    """Every record a stage kept offline under `reports`: in a finished run's report folder, or in
    the partial folder of a run that failed (not in `.<stage>.last/`, the runner's link to a finished
    run's folder, which pathlib's glob matches as it matches any folder)."""
    finished = [p for p in Path(reports).glob(f"*/{OFFLINE_FILE}") if not p.parent.name.startswith(".")]
    return sorted([*finished, *Path(reports).glob(f".*.partial/{OFFLINE_FILE}")])


def replay(record_file: Path, root: Path = Path(".")) -> str:
    """Send one kept record to the tracking store (`MLFLOW_TRACKING_URI`): its run (the one the
    stage had opened, or a new one under the pipeline run it belonged to), params, metrics, tags,
    input datasets, the files of its report folder and its curve, then the run's end. A record
    already sent is not sent again. Returns what was done, in a few words."""
    import json
    import time

    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    kept = json.loads(Path(record_file).read_text())
    key = kept.get("id") or _digest(Path(record_file))  # a record written before records had an id
    experiment_id = setup(root)
    client = mlflow.MlflowClient()

    def existing(run_id: str | None) -> Any:
        if not run_id:
            return None
        try:
            return client.get_run(run_id)
        except MlflowException:
            return None

    run = existing(kept.get("run_id"))
    if run is None:  # the stage never reached the server, or an earlier replay stopped half-way
        made = client.search_runs([experiment_id], f"tags.`{RECORD_TAG}` = '{key}'", max_results=1)
        run = made[0] if made else None
    if run is not None and run.data.tags.get(REPLAYED_TAG) == key:
        return f"already sent (run {run.info.run_id})"
    parent = existing(kept.get("parent_run_id"))
    if run is None:
        tags = {RECORD_TAG: key, "mlflow.runName": kept["stage"]}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.info.run_id
        run = client.create_run(experiment_id, start_time=kept.get("start_ms"), tags=tags, run_name=kept["stage"])
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    stamp = kept.get("end_ms") or now
    logged = run.data.params
    params = [Param(k, v) for k, v in kept.get("params", {}).items() if k not in logged]
    metrics = [Metric(k, float(v), stamp, 0) for k, v in kept.get("metrics", {}).items()]
    tags = [RunTag(k, str(v)) for k, v in kept.get("tags", {}).items()]
    for i in range(0, max(len(params), len(metrics), len(tags)), 100):  # MLflow's batch limit on params
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=tags[i:i + 100])
    folder = Path(record_file).parent
    _replay_curve(client, run_id, folder / "curves.csv", stamp)
    datasets = input_datasets(kept.get("inputs", {}))
    if datasets:
        from mlflow.entities import DatasetInput

        client.log_inputs(run_id, [DatasetInput(d._to_mlflow_entity(), []) for d in datasets])
    files = [f for f in folder.iterdir() if f.name != OFFLINE_FILE]
    for f in files:
        if f.is_dir():
            client.log_artifacts(run_id, str(f), artifact_path=f"{kept['stage']}/{f.name}")
        else:
            client.log_artifact(run_id, str(f), artifact_path=kept["stage"])
    status = kept.get("status") if kept.get("status") in ("FINISHED", "FAILED", "KILLED") else "FAILED"
    client.set_terminated(run_id, status=status, end_time=kept.get("end_ms") or now)
    client.set_tag(run_id, REPLAYED_TAG, key)  # last: a replay stopped before this does the rest again
    where = f" under pipeline run {parent.info.run_id}" if parent is not None else ""
    return f"sent as run {run_id}{where} ({len(metrics)} metrics, {len(files)} report files, {status.lower()})"


def _replay_curve(client: Any, run_id: str, curves: Path, stamp: int) -> None:
    """The training curve's points (a training stage's curves.csv) that the run does not hold yet."""
    import csv

    from mlflow.entities import Metric

    if not curves.is_file():
        return
    with curves.open() as f:
        rows = list(csv.DictReader(f))
    points = []
    for key in {k for r in rows for k in r} - {"step"}:
        have = {m.step for m in client.get_metric_history(run_id, metric_key(key))}
        points += [Metric(metric_key(key), float(r[key]), stamp, int(r["step"])) for r in rows
                   if r.get(key) not in (None, "") and int(r["step"]) not in have]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from stages.common.config import ConfigError, Paths, load_section, read_yaml

    ap = argparse.ArgumentParser(prog="python -m stages.common.tracking",
                                 description="The project's MLflow store from the command line.")
    sub = ap.add_subparsers(dest="command", required=True)
    send = sub.add_parser("replay", help="send every record a stage kept offline (reports/<stage>/"
                                         f"{OFFLINE_FILE}) to the tracking server, once")
    send.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (its paths.reports)")
    show = sub.add_parser("ui-address", help="the MLflow UI's page of the experiment's training runs")
    show.add_argument("base", help="where the UI serves the project's store, e.g. http://127.0.0.1:5000")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "ui-address":
        print(ui_address(Path("."), args.base))
        return 0
    try:
        reports = load_section(Paths, "paths", read_yaml(args.params), str(args.params)).reports
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = offline_records(reports)
    if not records:
        print(f"nothing to send: no {OFFLINE_FILE} under {reports}/")
        return 0
    failed = 0
    for record in records:
        try:
            print(f"{record}: {replay(record)}")
        except Exception as err:  # the server is still down, or refused the record: the next replay retries
            failed += 1
            print(f"{record}: not sent ({describe(err)})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
