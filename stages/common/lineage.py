"""Where a model came from, as DVC recorded it, and the record a registered model version carries.

- `dvc_hash(path)`: the md5 DVC gives a file or folder, computed by DVC's own code (dvc_data's
  `build`, as `dvc commit` runs it: the project's `.dvcignore` and DVC's hash cache when the path
  lies in a DVC project), so it is the value `dvc.lock` holds;
- `upstream(lock, path)`: the `dvc.lock` stages a folder came from, read from the lock itself;
- `git_state()`: the commit and the uncommitted code changes of the working tree (a run's own
  records, `dvc.lock`, `params.yaml`, reports and outputs, are not code);
- `record(...)`: what `register` writes on a model version: a handful of tags a person reads
  (commit, clean tree, params / dvc.lock / data digests, the lineage's state) and `lineage.json`
  (the `dvc.lock` entries of the chain, the datasets, the uncommitted files, the machine).

`flows/reproduce.py` reads that record back to rebuild the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common import tracking
from stages.common.config import StageError

log = logging.getLogger("llm_forge.lineage")

LOCK_FILE = Path("dvc.lock")

# The version tags `record` writes and `flows/reproduce.py` reads.
COMMIT_TAG = "git.commit"
CLEAN_TAG = "git.clean"
PARAMS_TAG = "params.md5"
LOCK_TAG = "dvc.lock.md5"
DATA_TAG = "data.md5"
LINEAGE_TAG = "llm_forge.lineage"
VERIFIED = "verified"  # LINEAGE_TAG's value when dvc.lock's hash of the folder is the folder's


# --- content hashes, by DVC's own code -----------------------------------------------------------


def dvc_hash(path: Path, root: Path = Path(".")) -> str:
    """DVC's md5 of a file (of its bytes) or folder (`<md5>.dir`, of its file list), as `dvc.lock`
    records it. Inside the DVC project at `root` it honours `.dvcignore` and DVC's hash cache (a
    file hashed before and unchanged is not read again); elsewhere it hashes the bytes."""
    from dvc_data.hashfile.build import build

    path = Path(path).resolve()
    repo = _repo(root)
    try:
        if repo is not None and path.is_relative_to(Path(repo.root_dir).resolve()):
            _, _, obj = build(repo.cache.local, str(path), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)
            return obj.hash_info.value
    finally:
        if repo is not None:
            repo.close()
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as odb:  # a dry run stores nothing; build wants a store all the same
        _, _, obj = build(HashFileDB(fs, odb), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def _repo(root: Path) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        return None


# --- lineage from dvc.lock -----------------------------------------------------------------------


def project_path(path: Path) -> str:
    """`path` as dvc.lock writes it: relative to the project root (the working directory), posix."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def read_lock(path: Path = LOCK_FILE) -> dict[str, dict[str, Any]]:
    """The `stages` of dvc.lock; empty when there is none (a project run without DVC)."""
    import yaml

    if not Path(path).is_file():
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise StageError(f"{path} is not valid YAML: {err}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def covers(out: str, path: str) -> bool:
    """Whether output `out` is `path` or a folder holding it."""
    return path == out or path.startswith(out.rstrip("/") + "/")


def producer(lock: dict[str, dict[str, Any]], path: str) -> tuple[str, str] | None:
    """(stage, out path) of the stage whose output is `path` or a folder holding it."""
    found = [(len(o["path"]), stage, o["path"]) for stage, entry in lock.items()
             for o in entry.get("outs") or [] if covers(o["path"], path)]
    return max(found)[1:] if found else None


def upstream(lock: dict[str, dict[str, Any]], path: str) -> list[str]:
    """The stages `path` came from: its producer and, recursively, the producers of their deps,
    in dvc.lock's order (the pipeline's)."""
    first = producer(lock, path)
    todo, seen = ([first[0]] if first else []), set()
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.add(stage)
        for dep in lock[stage].get("deps") or []:
            found = producer(lock, dep["path"])
            if found:
                todo.append(found[0])
    return [s for s in lock if s in seen]


def hash_value(item: dict[str, Any]) -> str:
    """The hash dvc.lock records for a dependency or output."""
    return str(item.get("md5") or item.get("etag") or item.get("checksum") or "")


def tag_key(key: str) -> str:
    """An MLflow tag key: letters, digits and `_ - . / space` (other characters become `_`)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)[:250]


def datasets(lock: dict[str, dict[str, Any]], chain: list[str], reports: str) -> dict[str, dict[str, Any]]:
    """path -> {md5, size, files} of the data the chain trained on: every output of a chain stage
    that another chain stage reads, except model folders (a `config.json` inside) and reports."""
    read = {dep["path"] for stage in chain for dep in lock[stage].get("deps") or []}
    found = {}
    for stage in chain:
        for out in lock[stage].get("outs") or []:
            path = out["path"]
            if (path in read and not covers(reports, path) and not (Path(path) / "config.json").is_file()):
                found[path] = {"md5": hash_value(out), "size": out.get("size"), "files": out.get("nfiles")}
    return dict(sorted(found.items()))


def digest(lines: list[str]) -> str:
    """md5 of `lines`, one per line: the data digest of `<path> <md5>` lines, sorted."""
    return hashlib.md5("".join(f"{line}\n" for line in sorted(lines)).encode()).hexdigest()


# --- the working tree ----------------------------------------------------------------------------


def git_state(root: Path, records: list[str]) -> tuple[str | None, list[str]]:
    """(HEAD's commit, the uncommitted code files) of the git working tree at `root`; (None, [])
    outside git. A change counts as code unless it is one of the run's records: a path in
    `records` or under one (dvc.lock, the params file, the reports folder, DVC's outputs), or a
    `.gitignore` (DVC writes them beside its outputs)."""
    commit = tracking.git_commit(root)
    if commit is None:
        return None, []
    done = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return commit, [f"(git status failed: {done.stderr.strip()[:200]})"]
    entries = done.stdout.split("\0")
    changed, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:  # a rename or copy: its source path follows
            i += 1
        if Path(path).name == ".gitignore" or any(covers(r.rstrip("/"), path.rstrip("/")) for r in records):
            continue
        changed.append(path)
    return commit, sorted(changed)


def machine() -> dict[str, Any]:
    """What a rebuild on another machine may differ by: the CPU count, torch's threads, versions."""
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "dvc"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "packages": versions}


# --- the record of a registered model -------------------------------------------------------------


@dataclass
class Record:
    """What a registered model version carries about where it came from."""

    tags: dict[str, str]
    """The version's lineage tags (a handful, each one short)."""
    doc: dict[str, Any]
    """`lineage.json`: the chain's dvc.lock entries, datasets, uncommitted files, machine."""
    params: dict[str, str]
    """The params sections of the chain (from dvc.lock), flattened: the logged model's params."""
    datasets: dict[str, dict[str, Any]]
    """path -> {md5, size, files}: the data the model was trained on."""


def record(lock: dict[str, dict[str, Any]], folder: Path, md5: str, *, reports: Path,
           params_file: Path, lock_file: Path = LOCK_FILE, root: Path = Path(".")) -> Record:
    """The record of the model in `folder` (content hash `md5`), from `lock` (dvc.lock's stages),
    the params file, and the git working tree at `root`."""
    path = project_path(folder)
    reports_path = project_path(reports)
    outs = [o["path"] for entry in lock.values() for o in entry.get("outs") or []]
    # DVC's own folder (its config names remotes and caches, never what a stage computes) is no code either
    commit, uncommitted = git_state(root, [lock_file.as_posix(), params_file.as_posix(), reports_path, ".dvc", *outs])
    if uncommitted:
        log.warning("the working tree has uncommitted code (%s): the version is marked so (%s: false), and "
                    "flows.reproduce will not rebuild it", ", ".join(uncommitted[:10]), CLEAN_TAG)
    chain = upstream(lock, path)
    found = datasets(lock, chain, reports_path)
    tags = {
        COMMIT_TAG: commit or "none (not a git repository)",
        CLEAN_TAG: str(commit is not None and not uncommitted).lower(),
        PARAMS_TAG: dvc_hash(params_file, root) if Path(params_file).is_file() else "none (no params file)",
        LOCK_TAG: dvc_hash(lock_file, root) if Path(lock_file).is_file() else "none (no dvc.lock)",
        DATA_TAG: digest([f"{p} {d['md5']}" for p, d in found.items()]) if found else "none (no data in dvc.lock)",
    }
    model: dict[str, Any] = {"path": path, "md5": md5}
    params: dict[str, str] = {}
    if not chain:
        tags[LINEAGE_TAG] = f"none: {'no dvc.lock' if not lock else f'no stage in dvc.lock writes {path}'}"
    else:
        stage, out = producer(lock, path)
        recorded = next(hash_value(o) for o in lock[stage]["outs"] if o["path"] == out)
        current = md5 if out == path else dvc_hash(Path(out), root)
        if recorded == current:
            tags[LINEAGE_TAG] = VERIFIED
        else:
            tags[LINEAGE_TAG] = f"unverified: dvc.lock records {recorded} for {out}, which hashes to {current}"
            log.warning("dvc.lock records %s for %s but the folder hashes to %s: the lineage is of an "
                        "older run (run the pipeline through `dvc repro`)", recorded, out, current)
        model.update(stage=stage, dvc_out=out, verified=recorded == current)
        for name in chain:
            for sections in (lock[name].get("params") or {}).values():
                params.update(tracking.flatten(sections or {}))
    doc = {"git": {"commit": commit, "clean": tags[CLEAN_TAG] == "true", "uncommitted": uncommitted},
           "model": model, "datasets": found, "machine": machine(),
           "stages": {name: lock[name] for name in chain}}
    return Record(tags, doc, {tag_key(k): v for k, v in params.items()}, found)
