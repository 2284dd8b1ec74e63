"""The shard executor: local processes and Ray write the same bytes, a failed run resumes, bad
input and dead workers are named."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stages.common.config import StageError
from stages.common.shards import DataConfig, ShardFailed, ShardTask, run_shards, shard_paths
from tests.conftest import run_in, tiny_config

DATA_STAGES = ("clean", "decontam", "dedup", "tokenize")
DATA_OUTS = ("data/clean", "data/quarantine", "data/decontam", "data/contaminated", "data/dedup", "data/tokenized")


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every file of the data stages' outputs, by path."""
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in DATA_OUTS for p in sorted((project / out).rglob("*")) if p.is_file()}


def set_data(project: Path, **values: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A local Ray cluster of 2 CPUs (`ray start --head --block`), stopped by its process id."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Ray head did not start")
    yield f"127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_local_and_ray_executors_write_the_same_bytes(tiny_project: Path, tmp_path: Path, ray_head: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny pipeline's data (one local worker) rewritten by two local processes and by Ray
    tasks on a 2-CPU cluster: every output file the same, so DVC sees no data output changed; and
    changing the executor in params.yaml leaves DVC nothing to rerun."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the test's cluster runs
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    before = snapshot(project)
    assert len(shard_paths(project / "data/clean", "corpus")) > 1  # the tiny profile has several shards
    for executor, workers in (("local", 2), ("ray", None)):
        set_data(project, executor=executor, workers=workers, ray_address=ray_head if executor == "ray" else None)
        status = run_in(project, "-m", "dvc", "status").stdout  # `data` is not a DVC param:
        assert "changed deps" not in status and "data/" not in status, status  # nothing to rerun
        for stage in DATA_STAGES:
            done = run_in(project, "-m", f"stages.{stage}", "--no-mlflow")
            assert "progress" in done.stderr, stage
        assert snapshot(project) == before, executor
        status = run_in(project, "-m", "dvc", "status").stdout
        assert "modified:" in status and "data/" not in status, (executor, status)  # only metrics' timings


def test_a_failed_run_redoes_only_unfinished_shards(tiny_project: Path, tmp_path: Path) -> None:
    """A shard that is not Parquet stops clean with one sentence naming it and leaves the old
    output; once it is fixed, the rerun takes the shards the failed run finished and redoes
    only the others, with the same output as a run from scratch."""
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    before = snapshot(project)
    shards = shard_paths(project / "data/raw", "corpus")
    bad = shards[2]
    good = bad.read_bytes()
    bad.write_bytes(b"PAR1 not really")
    failed = run_in(project, "-m", "stages.clean", "--no-mlflow", check=False)
    assert failed.returncode == 2
    assert f"{bad.resolve()}: not a readable Parquet shard" in failed.stderr.strip().splitlines()[-1]
    assert snapshot(project) == before  # the previous output stays; nothing half-written
    bad.write_bytes(good)
    done = run_in(project, "-m", "stages.clean", "--no-mlflow")
    total = sum(len(shard_paths(project / "data/raw", kind)) for kind in ("corpus", "instructions", "preferences"))
    assert f"clean: 2 of {total} shards already done by an earlier run, running the other {total - 2}" in done.stderr
    assert snapshot(project) == before
    assert not (project / "data/.clean.parts").exists()


def die_on_second(task: ShardTask, context: object) -> dict:
    if task.index == 1:
        time.sleep(1)  # shard 0 finishes first
        os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-shard (the OOM killer, a node lost)
    return {"docs_in": 1}


def test_a_dead_worker_is_named_and_the_rest_kept(tmp_path: Path) -> None:
    sources = []
    for i in range(3):
        sources.append(tmp_path / f"in-{i}.parquet")
        sources[-1].write_bytes(str(i).encode())
    tasks = [ShardTask("corpus", i, src, tmp_path / "parts") for i, src in enumerate(sources)]
    data = tiny_config("data", workers=2)
    with pytest.raises(ShardFailed, match=r"a worker process died while running corpus shard 1 .*rerun the stage"):
        run_shards("test", die_on_second, tasks, data, None, key="k")
    assert (tmp_path / "parts/done/test-corpus-00000.json").exists()  # a finished shard is kept for the rerun


def test_a_ray_address_that_does_not_answer_is_named() -> None:
    data = DataConfig(executor="ray", workers=None, ray_address=f"127.0.0.1:{free_port()}", progress_seconds=1)
    task = ShardTask("corpus", 0, Path(__file__), Path("unused"))
    with pytest.raises(StageError, match=r"data.ray_address 127.0.0.1:\d+: no Ray cluster answers there"):
        run_shards("test", die_on_second, [task], data, None, key="k")

