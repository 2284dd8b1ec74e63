"""Promise: a data stage killed (kill -9) at any moment and run again leaves outputs byte-identical
to an uninterrupted run, never a half-written output folder, and nothing partial in DVC's cache
or `dvc.lock`.

Each data stage runs under `dvc repro` on the tiny profile, is killed with its whole process
group at a seeded random moment, or the moment its temporary output folder appears, whichever
comes first, and is then run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import stage_order
from stages.common.io import _alive
from tests.conftest import ROOT, make_project, project_env, run_in

DATA_STAGES = stage_order("tokenize", ROOT)  # tokenize and every stage it depends on, from dvc.yaml
SEED = 9


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_in(project, "-m", "dvc", *args)


def lock_entry(project: Path, stage: str) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]


def outs(project: Path, stage: str) -> list[Path]:
    return [project / o["path"] for o in lock_entry(project, stage)["outs"]]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file's bytes under `path` (a file or a folder); None when it does not exist. A
    stage's `metrics.json` (in `dvc.lock` as an uncached output) holds its wall time and rates,
    which are left out: every other byte must match."""
    if path.name == "metrics.json" and path.is_file():
        metrics = json.loads(path.read_text())
        for timing in ("seconds", "docs_per_second", "tokens_per_second"):
            metrics.pop(timing, None)
        return {"": json.dumps(metrics, sort_keys=True).encode()}
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def without_metrics(entry: dict) -> dict:
    """A `dvc.lock` entry without the hashes of its metrics files (they hold wall times)."""
    return {**entry, "outs": [o for o in entry["outs"] if not o["path"].endswith("metrics.json")]}


def temp_siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.*") if ".tmp-" in p.name or ".old-" in p.name]


def cache_objects(project: Path) -> dict[str, bytes]:
    """DVC's cache: object name (md5) -> bytes; each one checked to hold what its name says."""
    found = {}
    for obj in (project / ".dvc/cache/files/md5").rglob("*"):
        if obj.is_file():
            name = obj.parent.name + obj.name
            data = obj.read_bytes()
            if not name.endswith(".dir"):  # a file object's name is its content's md5
                assert hashlib.md5(data).hexdigest() == name, f"torn cache object {obj}"
            found[name] = data
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, dict]:
    """The data stages run once, uninterrupted, through DVC: the project, each stage's output
    bytes, how long each stage took, and the cache's `.dir` manifests."""
    project = make_project(tmp_path_factory.mktemp("interrupts") / "project")
    outputs, took = {}, {}
    for stage in DATA_STAGES:
        started = time.monotonic()
        dvc(project, "repro", "--single-item", stage)
        took[stage] = time.monotonic() - started
        outputs[stage] = {o: snapshot(o) for o in outs(project, stage)}
        assert all(outputs[stage].values()), stage
    manifests = {k for k in cache_objects(project) if k.endswith(".dir")}
    return project, outputs, took, manifests


def kill_at_random(project: Path, stage: str, after: float, watch: list[Path]) -> str:
    """`dvc repro --force` of `stage`, its process group killed after `after` seconds or as soon
    as a temporary output folder appears; returns when it was killed."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", stage], cwd=project,
                            env=project_env(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    started = time.monotonic()
    moment = "finished before the kill"
    while proc.poll() is None:
        elapsed = time.monotonic() - started
        if any(temp_siblings(o) for o in watch):
            moment = f"writing its output ({elapsed:.1f}s)"
        elif elapsed >= after:
            moment = f"at {elapsed:.1f}s"
        else:
            time.sleep(0.005)
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        break
    proc.wait()
    return moment


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_kill_9_then_rerun_is_identical(reference: tuple, stage: str) -> None:
    project, outputs, took, manifests = reference
    rng = random.Random(f"{SEED}-{stage}")
    locked = lock_entry(project, stage)
    after = rng.uniform(0.2, 0.9) * took[stage]
    for _ in range(4):  # the machine may run the stage faster than the reference did: kill sooner
        moment = kill_at_random(project, stage, after, list(outputs[stage]))
        if moment != "finished before the kill":
            break
        after /= 3
    assert moment != "finished before the kill", f"{stage} always finished before {after:.2f}s"

    # right after the kill: every output is either gone or complete, never half-written
    for out, expected in outputs[stage].items():
        assert snapshot(out) in (None, expected), f"{stage} killed {moment}: {out} is half-written"
    # nothing partial was cached or locked (a kill just after DVC locked a finished run leaves the
    # lock of a complete output: the same hashes, but for the metrics file's wall time)
    assert without_metrics(lock_entry(project, stage)) == without_metrics(locked)
    cached = cache_objects(project)
    assert {k for k in cached if k.endswith(".dir")} <= manifests, f"{stage} killed {moment}: a partial .dir"

    # run again: what DVC decides to do gives the same bytes (computed afresh, not restored from
    # DVC's run cache, so the stage itself is shown to be repeatable)
    dvc(project, "repro", "--single-item", "--no-run-cache", stage)
    for out, expected in outputs[stage].items():
        assert snapshot(out) == expected, f"{stage} killed {moment}: {out} differs after the rerun"
        # a killed run's temporary folder is removed by the stage's next run; one can remain
        # only where DVC found the output complete and did not run the stage again
        for left in temp_siblings(out):
            assert not _alive(int(left.name.split("-")[1])), f"{stage}: {left} of a live process"
    assert without_metrics(lock_entry(project, stage)) == without_metrics(locked)
    assert {k for k in cache_objects(project) if k.endswith(".dir")} <= manifests
    status = dvc(project, "status", stage)
    assert "up to date" in status.stdout or not status.stdout.strip(), status.stdout
