"""Data in shards, and the executor that runs a data stage over them.

A data folder holds one folder per kind, each a sequence of Parquet shards
(`data/clean/corpus/part-00000.parquet`, ...). `collect` cuts them at `collect.shard_bytes` of
text, and every later data stage writes shard N of its output from shard N of its input, so a
stage holds one shard at a time, never the corpus.

A data stage is one function applied to every shard (`ShardTask`, a shared context -> a small
JSON result), run by the executor the `data` section names: `local` (in this process with one
worker, else a process pool of `data.workers`) or `ray` (one Ray task per shard, on the cluster at
`data.ray_address` or `RAY_ADDRESS`, else a Ray started for the stage). A shard's output depends on
the shard and the stage's params only, so every executor and worker count writes the same bytes:
`data` is how a stage runs, not what it computes, and no `dvc.yaml` stage lists it.

Finished shards survive a failed run. Each shard writes its outputs and its result into the
stage's parts folder (`.<output>.parts/` beside the stage's first output), under a key of the
stage's params and the shard's bytes; a rerun takes the shards whose key still matches from there
and runs only the others. Only when every shard is done are the outputs moved into place
(`datastage.DataStage.publish`), so DVC never caches a half-written output.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from stages.common.atomic import atomic_file
from stages.common.config import StageConfig, StageError

log = logging.getLogger("llm_forge.shards")

SHARD = "part-{:05d}.parquet"
PROGRESS = "progress"
"""First word of a progress line (`progress clean: 3/10 shards, ...`): the pipeline flow shows
these lines as a progress bar in the Prefect UI."""


class DataConfig(StageConfig):
    """The `data` section: how the data stages run their shards (never what they write)."""

    executor: Literal["local", "ray"]
    """local: this machine, a process pool of `workers`; ray: Ray tasks on a Ray cluster."""
    workers: int | None = Field(ge=1)
    """Processes of the local executor (null: the machine's cores); Ray uses its cluster's CPUs."""
    ray_address: str | None
    """Ray cluster to run on (host:port, `ray://host:port`, or auto); null: the RAY_ADDRESS
    variable, else a Ray started on this machine for the stage."""
    progress_seconds: float = Field(gt=0)
    """Least time between two progress lines of a stage (shards done, docs/s, ETA)."""


class ShardFailed(RuntimeError):
    """A shard's worker died or could not be reached: one sentence; rerunning the stage redoes
    only the shards that did not finish."""


# --- shards on disk ---------------------------------------------------------------------------


def kind_dir(folder: Path, kind: str) -> Path:
    return Path(folder) / kind


def shard_path(folder: Path, kind: str, index: int) -> Path:
    return kind_dir(folder, kind) / SHARD.format(index)


def shard_paths(folder: Path, kind: str) -> list[Path]:
    """The shards of `kind` in `folder`, in order; a folder without that kind holds none."""
    return sorted(kind_dir(folder, kind).glob("part-*.parquet"))


def write_table(path: Path, table: pa.Table) -> Path:
    """Write `table` to `path` through a temporary sibling, so a reader (or a rerun) never sees
    half a shard."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_arrays(path: Path, arrays: dict[str, Any]) -> Path:
    """numpy arrays to `path` (.npz) through a temporary sibling: a step's per-shard working data."""
    import numpy as np

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def write_array(path: Path, array: Any) -> Path:
    """One numpy array to `path` (.npy, which a later step can memory-map and read in part),
    through a temporary sibling."""
    import numpy as np

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard; a file that is not readable Parquet is bad input, named."""
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, pa.ArrowException) and not Path(path).exists():
            raise
        raise StageError(f"{path}: not a readable Parquet shard ({err}); rerun the stage that wrote it") from err


def file_digest(path: Path) -> str:
    """A hash of a file's bytes, computed once per process while its size and mtime stand (a
    stage's steps key the same input shards)."""
    stat = os.stat(path)
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Records of one kind written as shards of at most `max_bytes` of text each (a record
    larger than that is a shard of its own); `close()` writes the last one, and an empty shard
    when there was no record, so the kind keeps its schema."""

    def __init__(self, folder: Path, kind: str, max_bytes: int, to_table: Callable[[list[dict[str, Any]]], pa.Table],
                 size: Callable[[dict[str, Any]], int]) -> None:
        self.folder, self.kind, self.max_bytes = Path(folder), kind, max_bytes
        self.to_table, self.size = to_table, size
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.shards = 0

    def add(self, record: dict[str, Any]) -> None:
        n = self.size(record)
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending.append(record)
        self.pending_bytes += n

    def flush(self) -> None:
        if self.pending or not self.shards:
            write_table(shard_path(self.folder, self.kind, self.shards), self.to_table(self.pending))
            self.shards += 1
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self.flush()


# --- the tasks and the parts folder ------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    """Shard `index` of `kind`: read `source`, write each output `name` to `out(name)`."""

    kind: str
    index: int
    source: Path
    parts: Path

    def out(self, name: str) -> Path:
        return shard_path(self.parts / name, self.kind, self.index)

    @property
    def label(self) -> str:
        return f"{self.kind} shard {self.index} ({self.source})"


def parts_dir(output: Path) -> Path:
    """Where a stage keeps its finished shards until all are done: beside its first output (an
    absolute path, as every path a worker is given: a Ray worker does not start in this folder)."""
    output = Path(output).absolute()
    return output.with_name(f".{output.name}.parts")


def tasks_for(source: Path, parts: Path, kinds: Sequence[str]) -> list[ShardTask]:
    """A task per shard of `kinds` in `source`, by absolute path: a Ray worker does not start in
    the stage's folder (on a cluster of several machines the project must be on a filesystem
    they share)."""
    parts = Path(parts).absolute()
    return [ShardTask(kind, i, path.absolute(), parts) for kind in kinds
            for i, path in enumerate(shard_paths(source, kind))]


def _marker(stage: str, task: ShardTask) -> Path:
    return task.parts / "done" / f"{stage.replace(' ', '-')}-{task.kind}-{task.index:05d}.json"


@functools.cache
def code_digest() -> str:
    """A hash of this project's stage code: a shard finished by other code is not reused."""
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def _task_key(task: ShardTask, key: str) -> str:
    return hashlib.sha256(f"{key}\x00{code_digest()}\x00{file_digest(task.source)}".encode()).hexdigest()[:24]


# --- the executor -------------------------------------------------------------------------------


Fn = Callable[[ShardTask, Any], dict[str, Any]]


def run_shards(stage: str, fn: Fn, tasks: list[ShardTask], data: DataConfig, context: Any, key: str,
               docs: Callable[[dict[str, Any]], int] = lambda r: int(r.get("docs_in", 0))) -> list[dict[str, Any]]:
    """`fn(task, context)` for every task, by `data.executor`; the results in task order.

    `key` is what the outputs depend on besides the shard (the stage's params, the files it
    reads): a shard finished under the same key by an earlier, failed run is not run again.
    `context` goes to every worker once. Progress (shards done, docs/s, ETA) is logged at most
    every `data.progress_seconds`."""
    results: dict[int, dict[str, Any]] = {}
    keys = {i: _task_key(t, f"{stage}\x00{key}") for i, t in enumerate(tasks)}
    for i, task in enumerate(tasks):
        try:
            saved = json.loads(_marker(stage, task).read_text())
        except (OSError, ValueError):
            continue
        if saved.get("key") == keys[i] and all(Path(p).exists() for p in saved.get("outputs", [])):
            results[i] = saved["result"]
    if results:
        log.info("%s: %d of %d shards already done by an earlier run, running the other %d", stage,
                 len(results), len(tasks), len(tasks) - len(results))
    todo = [i for i in range(len(tasks)) if i not in results]
    progress = ShardProgress(stage, len(tasks), data.progress_seconds, done=len(results))

    def finished(i: int, result: dict[str, Any]) -> None:
        task = tasks[i]
        outputs = sorted(str(p) for p in task.parts.glob(f"*/{task.kind}/part-{task.index:05d}.*"))
        marker = _marker(stage, task)
        with atomic_file(marker) as tmp:
            tmp.write_text(json.dumps({"key": keys[i], "outputs": outputs, "result": result}))
        results[i] = result
        progress.step(docs(result))

    if todo:
        if data.executor == "ray":
            _run_ray(fn, tasks, todo, data, context, finished)
        else:
            workers = min(data.workers or os.cpu_count() or 1, len(todo))
            _run_local(fn, tasks, todo, workers, context, finished)
    progress.close()
    return [results[i] for i in range(len(tasks))]


class ShardProgress:
    """Shards done, documents per second and the time left, logged as one line at most every
    `every` seconds (and at the end)."""

    def __init__(self, stage: str, total: int, every: float, done: int = 0) -> None:
        self.stage, self.total, self.every = stage, total, every
        self.done, self.docs = done, 0
        self.started = self.last = time.perf_counter()
        self.first = done

    def step(self, docs: int) -> None:
        self.done += 1
        self.docs += docs
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.show()

    def show(self) -> None:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        ran = self.done - self.first
        eta = (self.total - self.done) * seconds / ran if ran else 0.0
        log.info("%s %s: %d/%d shards, %d docs, %.0f docs/s, ETA %.0fs", PROGRESS, self.stage, self.done,
                 self.total, self.docs, self.docs / seconds, eta)

    def close(self) -> None:
        if self.total:
            self.show()


_CONTEXT: Any = None


def _init_worker(context: Any) -> None:
    global _CONTEXT
    _CONTEXT = context
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _call(fn: Fn, task: ShardTask) -> dict[str, Any]:
    return fn(task, _CONTEXT)


def _run_local(fn: Fn, tasks: list[ShardTask], todo: list[int], workers: int, context: Any,
               finished: Callable[[int, dict[str, Any]], None]) -> None:
    if workers <= 1:  # one worker: no pool to start and nothing to pickle
        for i in todo:
            finished(i, fn(tasks[i], context))
        return
    # spawn, not fork: the stage process may already run threads (Arrow's, the tokenizers').
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(context,)) as pool:
        running: dict[Future[dict[str, Any]], int] = {}
        queue = list(todo)
        while queue or running:
            while queue and len(running) < 2 * workers:  # a few ahead, not every shard at once
                i = queue.pop(0)
                running[pool.submit(_call, fn, tasks[i])] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as err:
                    lost = sorted([i, *running.values()])
                    others = f" or one of {len(lost) - 1} other shards" if len(lost) > 1 else ""
                    raise ShardFailed(f"a worker process died while running {tasks[lost[0]].label}{others} "
                                      "(killed, or out of memory?); rerun the stage to redo the unfinished "
                                      "shards") from err
                finished(i, result)


def ray_address(data: DataConfig) -> str | None:
    return data.ray_address or os.environ.get("RAY_ADDRESS") or None


def _check_reachable(address: str) -> None:
    """A host:port that does not answer is named at once (Ray itself retries for a minute)."""
    if address == "auto" or address.startswith(("ray://", "local")):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except (OSError, ValueError) as err:
        raise StageError(f"data.ray_address {address}: no Ray cluster answers there ({err.__class__.__name__}); "
                         "start one (`ray start --head`) or set data.executor: local") from err


def _run_ray(fn: Fn, tasks: list[ShardTask], todo: list[int], data: DataConfig, context: Any,
             finished: Callable[[int, dict[str, Any]], None]) -> None:
    import ray

    address = ray_address(data)
    if address:
        _check_reachable(address)
    # Workers import this project's modules: the driver's folder goes on their path.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    if not ray.is_initialized():  # once per stage process; Ray shuts down with it
        started = time.perf_counter()
        # no address: a Ray of this machine's own, started for the stage ("local": never another
        # cluster that happens to run here)
        ray.init(address=address or "local", num_cpus=None if address else (data.workers or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, runtime_env=env)
        log.info("ray: connected to %s in %.1fs (%s CPUs)", address or "a local Ray",
                 time.perf_counter() - started, ray.cluster_resources().get("CPU"))
    ref = ray.put(context)
    # A task whose worker dies is retried by Ray (max_retries) before it counts as failed.
    remote = ray.remote(max_retries=2)(_ray_call)
    pending = {remote.remote(fn, tasks[i], ref): i for i in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for obj in ready:
            i = pending.pop(obj)
            try:
                finished(i, ray.get(obj))
            except ray.exceptions.RayTaskError as err:
                cause = err.as_instanceof_cause()
                if isinstance(cause, StageError):
                    raise StageError(str(err.cause)) from None
                raise
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
                raise ShardFailed(f"the Ray worker running {tasks[i].label} died ({err.__class__.__name__}); "
                                  "rerun the stage to redo the unfinished shards") from err


def _ray_call(fn: Fn, task: ShardTask, context: Any) -> dict[str, Any]:
    return fn(task, context)


def iter_records(folder: Path, kind: str) -> Iterator[dict[str, Any]]:
    """Every record of `kind` in `folder`, one shard in memory at a time."""
    for path in shard_paths(folder, kind):
        yield from read_shard(path).to_pylist()
