"""The thin `main()` every stage shares: params file -> typed config -> `run` -> metrics + MLflow.

A stage module ends with

    def main(argv=None):
        return run_stage("clean", CleanConfig, run, argv)

so `python -m stages.clean [--params params.yaml]` runs it. A stage that needs a value of another
section names it in `reads` (its module's `READS`, and the key in its dvc.yaml `params`), and gets
it as `run(cfg, paths, <section>=...)`: one value stays in one place. The runner calls
`run(cfg, paths)`, writes the metrics it returns to `reports/<stage>/metrics.json` (the DVC metrics
file) and logs everything to MLflow. The stage's reports go to `reports/.<stage>.partial/` while it
runs (its `paths.report_dir(<stage>)`), and replace `reports/<stage>/` only when it has finished: a
run that fails or is killed leaves the last finished run's reports and metrics as they were (under
`dvc repro` too, which deletes a stage's declared outputs first: `reports/.<stage>.last/` keeps
links to them), and says where its own partial reports are (a training stage's rerun continues
their `curves.csv`, as it resumes from that run's checkpoint). Bad input ends the process with exit
code 2 and one sentence on stderr, not a traceback; so does an output that cannot be written (a
full disk, a read-only folder), which names the folder and leaves its previous contents as they
were. A data stage whose worker died says so in one sentence and exits 1: a rerun may pass.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, PrivateAttr

from stages.common import tracking
from stages.common.config import Paths, StageError, load_section, read_yaml
from stages.common.io import atomic_dir, write_json
from stages.common.shards import ShardFailed

C = TypeVar("C", bound=BaseModel)
log = logging.getLogger("llm_forge")


def run_stage(name: str, cfg_cls: type[C], run: Callable[..., dict[str, Any]],
              argv: list[str] | None = None, *, reads: Mapping[str, type[BaseModel]] | None = None,
              training: type[BaseModel] | None = None) -> int:
    """Run stage `name` from the params file, with the other sections it `reads` as keyword
    arguments; a training stage (`training=TrainConfig`: the type of the shared `train` section,
    passed in so that the runner imports no training code for the other stages) also gets that
    section as `run(cfg, paths, train=...)` and may relaunch itself under `accelerate launch`
    (`train.relaunch`), where only the main process writes reports and logs to MLflow."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(run, "__module__", None) == "__main__" and getattr(main_spec, "name", None) == f"stages.{name}":
        # `python -m stages.<name>` runs the module as __main__: take its functions and classes
        # from the module under its own name, which a worker process (Ray's) can import.
        own = importlib.import_module(f"stages.{name}")
        run, cfg_cls = getattr(own, run.__name__), getattr(own, cfg_cls.__name__)
    module = sys.modules.get(f"stages.{name}") or sys.modules.get("__main__")
    doc = (module.__doc__ or "").strip().splitlines()[0] if module and module.__doc__ else None
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log this run to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    extra: dict[str, Any] = {}
    try:
        params = read_yaml(args.params)
        cfg = load_section(cfg_cls, name, params, str(args.params))
        paths = load_section(Paths, "paths", params, str(args.params))
        sections = dict(reads or {})
        if training is not None:
            sections["train"] = training
        extra = {key: load_section(cls, key, params, str(args.params)) for key, cls in sections.items()}
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if training is not None:
        try:
            code = extra["train"].relaunch(name, sys.argv[1:] if argv is None else argv)
            if code is not None:
                return code
            if os.environ.get("RANK", "0") != "0":  # a worker of a distributed run: train, report nothing
                run(cfg, paths, **extra)
                return 0
        except StageError as err:
            print(f"error: {name}: {err}", file=sys.stderr)
            return 2

    try:
        return _run_and_report(name, cfg, paths, run, extra, training=training is not None,
                               mlflow_on=not args.no_mlflow)
    except ShardFailed as err:  # not bad input: exit 1, which the pipeline flow retries
        print(f"error: {name}: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        message = write_failure(err)
        if message is None:
            raise
        print(f"error: {name}: {message}", file=sys.stderr)
        return 2


PARTIAL = ".{}.partial"  # a stage's report folder while it runs, beside the last finished run's
# Hard links to the last finished run's reports. `dvc repro` deletes a stage's declared outputs
# (its metrics.json, curves, chart) before it runs the stage: the runner puts them back from here,
# so that until a run finishes, reports/<stage>/ is the last finished run's, as dvc.lock says.
LAST = ".{}.last"
CURVES = "curves.csv"  # what a training stage's next run continues (stages.common.training.Curves)


class StagedPaths(Paths):
    """`Paths` whose report folder of the running stage is its partial folder: the stage writes
    there, and the runner swaps it into place when the stage has finished."""

    _staged: dict[str, Path] = PrivateAttr(default_factory=dict)

    def report_dir(self, stage: str) -> Path:
        return self._staged.get(stage) or super().report_dir(stage)


def partial_dir(report: Path) -> Path:
    return report.with_name(PARTIAL.format(report.name))


def _linked(src: Path, dest: Path, missing_only: bool) -> None:
    """Every file under `src` linked (hard links: no copy) at the same place under `dest`."""
    for f in sorted(src.rglob("*")):
        target = dest / f.relative_to(src)
        if f.is_file() and not (missing_only and target.exists()):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, target)


def _staged(paths: Paths, name: str, partial: Path) -> StagedPaths:
    staged = StagedPaths(**{k: getattr(paths, k) for k in Paths.model_fields})
    staged._staged[name] = partial
    return staged


def _run_and_report(name: str, cfg: BaseModel, paths: Paths, run: Callable[..., dict[str, Any]],
                    extra: dict[str, Any], *, training: bool, mlflow_on: bool) -> int:
    report = paths.report_dir(name)
    partial, last = partial_dir(report), report.with_name(LAST.format(report.name))
    if last.is_dir():
        _linked(last, report, missing_only=True)
    # A training stage's rerun continues the curve of the run before it (the one that failed or
    # was killed, else the last finished one): it resumes from that run's checkpoint.
    curve = next((f.read_bytes() for f in (partial / CURVES, report / CURVES) if training and f.is_file()), None)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if curve is not None:
        (partial / CURVES).write_bytes(curve)
    # The resolved config beside the results, so every report says what produced it.
    resolved = {name: cfg.model_dump(mode="json"), **{k: v.model_dump(mode="json") for k, v in extra.items()}}
    (partial / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    try:
        metrics = _run_staged(name, cfg, _staged(paths, name, partial), run, extra, resolved, partial, report,
                              mlflow_on=mlflow_on)
    except StageError as err:
        _kept(name, partial, report)
        print(f"error: {name}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if write_failure(err) is not None:  # a full or read-only disk: leave no folder behind
            shutil.rmtree(partial, ignore_errors=True)
        else:
            _kept(name, partial, report)
        raise
    except BaseException:
        _kept(name, partial, report)
        raise
    with atomic_dir(report) as tmp:  # the finished run's folder replaces the last one's
        tmp.rmdir()
        os.replace(partial, tmp)
    shutil.rmtree(last, ignore_errors=True)
    _linked(report, last, missing_only=False)
    log.info("%s done in %.1fs: %s", name, metrics["seconds"], _summary(metrics))
    return 0


def _run_staged(name: str, cfg: BaseModel, paths: Paths, run: Callable[..., dict[str, Any]], extra: dict[str, Any],
                resolved: dict[str, Any], partial: Path, report: Path, *, mlflow_on: bool) -> dict[str, Any]:
    """The stage, writing its reports into `partial`; returns its metrics."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if mlflow_on:
            # the stage's own keys as they are, the sections it reads under their names
            stack.enter_context(tracking.stage_run(name, {**resolved[name], **{k: resolved[k] for k in extra}},
                                                   report_dir=partial, home=report))
        try:
            metrics = run(cfg, paths, **extra)
        except StageError:
            if mlflow_on:  # what the stage reported before it failed (validation results)
                tracking.log_report(name, partial)
                tracking.fail()
            raise
        metrics = {**metrics, "seconds": round(time.perf_counter() - started, 2)}
        write_json(partial / "metrics.json", metrics)
        if mlflow_on:
            tracking.log_stage_result(name, metrics, partial)
    return metrics


def _kept(name: str, partial: Path, report: Path) -> None:
    """Say where a failed run's reports are, and that the last finished run's are untouched; a run
    that wrote none (bad input found before any work) leaves no folder and nothing to say."""
    if not any(p.name != "params.yaml" for p in partial.iterdir()):
        shutil.rmtree(partial, ignore_errors=True)
        return
    last = "keeps the last finished run's" if (report / "metrics.json").is_file() else "holds no finished run"
    log.warning("%s did not finish: its reports so far are in %s/; %s/ %s", name, _shown(partial), _shown(report),
                last)


# OSErrors that mean an output could not be written, for a cause a user fixes outside the code.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def write_failure(err: OSError) -> str | None:
    """One sentence for an OSError that means the output could not be written (disk full,
    read-only or forbidden folder, file size limit), naming the folder; None for any other."""
    if err.errno not in WRITE_ERRNOS:
        return None
    output = getattr(err, "output", None)  # set by io.atomic_dir, which leaves the old folder as it was
    target = output or err.filename
    where = _shown(Path(target)) if target else "its output"
    kept = "; its previous contents are unchanged" if output else ""
    return f"cannot write {where}: {os.strerror(err.errno).lower()}{kept}"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_in_process(stages: list[str], params: dict[str, Any], paths: Paths, cwd: Path | None = None) -> None:
    """Each of `stages` in order, in this process and without MLflow: `run(cfg, paths, **reads)`
    from `params` (the tests' and benchmarks' way to make a stage's inputs). `cwd`: the project
    root that sources name paths relative to (assets/, pkg://)."""
    import importlib

    from stages.common.config import config_class

    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        for stage in stages:
            module = importlib.import_module(f"stages.{stage}")
            reads = {key: load_section(cls, key, params) for key, cls in getattr(module, "READS", {}).items()}
            module.run(load_section(config_class(stage), stage, params), paths, **reads)
    finally:
        os.chdir(before)


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, (dict, list)))
