"""Promise: a disk that fills up or an output folder that cannot be written stops a stage with one
sentence naming the folder and the cause (exit code 2), the previous output intact and no
temporary folder left behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common import io
from stages.common.config import Paths, StageConfig
from stages.common.io import atomic_dir
from stages.common.runner import run_stage
from tests.conftest import ROOT, project_env, tiny_params

PATH_KEYS = tuple(Paths.model_fields)


class FakeConfig(StageConfig):
    files: int


def write_files(cfg: FakeConfig, paths: object) -> dict:
    """A stage that writes `cfg.files` files into its atomic output folder `paths.raw`."""
    with atomic_dir(paths.raw) as tmp:
        for i in range(cfg.files):
            (tmp / f"part-{i}.txt").write_text("new\n" * 1000)
    return {"docs_in": cfg.files, "docs_out": cfg.files, "dropped": {}}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture
def fake_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    params = {"paths": {k: f"out/{k}" for k in PATH_KEYS}, "fake": {"files": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    old = tmp_path / "out/raw"
    old.mkdir(parents=True)
    (old / "part-0.txt").write_text("old output\n")
    return tmp_path


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left on device"),
                                             (errno.EFBIG, "file too large"),
                                             (errno.EDQUOT, "disk quota exceeded")])
def test_a_write_that_fails_is_one_sentence_and_keeps_the_old_output(
        fake_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, code: int,
        words: str) -> None:
    before = snapshot(fake_project / "out/raw")
    real_write = Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == "part-1.txt":
            raise OSError(code, os.strerror(code))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert run_stage("fake", FakeConfig, write_files, ["--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: fake: cannot write out/raw: {words}; its previous contents are unchanged", err
    assert snapshot(fake_project / "out/raw") == before
    assert leftovers(fake_project / "out/raw") == []


@pytest.mark.parametrize(("code", "refused"), [(errno.EROFS, "raw"), (errno.EACCES, ".raw.tmp-")])
def test_a_folder_that_cannot_be_replaced_keeps_the_old_output(
        fake_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, code: int,
        refused: str) -> None:
    """The last step fails: moving the old folder aside (EROFS), or the finished one into place
    (EACCES, after the old one was moved aside: it is put back)."""
    before = snapshot(fake_project / "out/raw")
    real_replace = os.replace

    def refuse(src: object, dst: object) -> None:
        if Path(src).name.startswith(refused):
            raise OSError(code, os.strerror(code), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", refuse)
    assert run_stage("fake", FakeConfig, write_files, ["--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fake: cannot write out/raw: ") and err.count("\n") == 0, err
    assert os.strerror(code).lower() in err
    assert snapshot(fake_project / "out/raw") == before
    assert leftovers(fake_project / "out/raw") == []


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(fake_project: Path) -> None:
    out = fake_project / "out/raw"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.with_name(f".raw.tmp-{dead.stdout.strip()}-0123abcd")
    stale.mkdir()
    running = out.with_name(f".raw.tmp-{os.getppid()}-0123abcd")  # a live process's: kept
    running.mkdir()
    assert run_stage("fake", FakeConfig, write_files, ["--no-mlflow"]) == 0
    assert leftovers(out) == [running]
    assert sorted(snapshot(out)) == ["part-0.txt", "part-1.txt", "part-2.txt"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A real 64 KiB tmpfs, where the machine lets this test mount one (root with CAP_SYS_ADMIN)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_collect_on_a_full_and_then_read_only_disk(tmp_path: Path, small_disk: Path) -> None:
    """The real collect stage, its output folder on a 64 KiB disk: it needs more than that."""
    params = tiny_params()
    params = {**params, "paths": {**params["paths"], "raw": str(small_disk / "raw"),
                                  "reports": str(tmp_path / "reports")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    old = small_disk / "raw"
    old.mkdir()
    (old / "corpus").mkdir()
    (old / "corpus" / "part-00000.parquet").write_bytes(b"the previous output")
    before = snapshot(old)

    def collect() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stages.collect", "--params", str(tmp_path / "params.yaml"),
                               "--no-mlflow"], cwd=ROOT, env=project_env(tmp_path), capture_output=True, text=True)

    full = collect()
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: collect: cannot write {old}: no space left on device; "
                      "its previous contents are unchanged"], full.stderr[-3000:]
    assert snapshot(old) == before and leftovers(old) == []

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    read_only = collect()
    assert read_only.returncode == 2, read_only.stderr[-3000:]
    errors = [line for line in read_only.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: collect: cannot write {old}: read-only file system")
    assert snapshot(old) == before and leftovers(old) == []
