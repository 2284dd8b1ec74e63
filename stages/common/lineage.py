"""Where a model came from, as DVC recorded it: content hashes computed as DVC computes them, and
the chain of `dvc.lock` stages upstream of a model folder.

`register` tags each registered model version with these (so a version names the data, code and
params that made it); any stage or flow that needs to know "which run of the pipeline made this
folder" reads them the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from stages.common import tracking
from stages.common.config import StageError

log = logging.getLogger("llm_forge.lineage")

LOCK_FILE = Path("dvc.lock")


# --- content hashes, as DVC computes them ------------------------------------------------------


class Hasher:
    """md5 of files and folders exactly as DVC 3 computes them (`hash: md5` in dvc.lock): a file is
    the md5 of its bytes; a folder is the md5 of the JSON list of `{md5, relpath}` of its files,
    sorted by path, plus `.dir`. File hashes are cached, so a folder and its parent hash once."""

    def __init__(self) -> None:
        self._files: dict[Path, str] = {}

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        if path not in self._files:
            h = hashlib.md5()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._files[path] = h.hexdigest()
        return self._files[path]

    def folder(self, folder: Path) -> str:
        folder = Path(folder)
        entries = sorted(({"md5": self.file(p), "relpath": p.relative_to(folder).as_posix()}
                          for p in folder.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
        return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"

    def path(self, path: Path) -> str:
        return self.folder(path) if Path(path).is_dir() else self.file(path)


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


def _covers(out: str, path: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def producer(lock: dict[str, dict[str, Any]], path: str) -> tuple[str, str] | None:
    """(stage, out path) of the stage whose output is `path` or a folder holding it."""
    found = [(len(o["path"]), stage, o["path"]) for stage, entry in lock.items()
             for o in entry.get("outs") or [] if _covers(o["path"], path)]
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


def _hash_value(item: dict[str, Any]) -> str:
    return str(item.get("md5") or item.get("etag") or item.get("checksum") or "")


def tag_key(key: str) -> str:
    """An MLflow tag key: letters, digits and `_ - . / space` (other characters become `_`)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)[:250]


def lineage(lock: dict[str, dict[str, Any]], folder: Path, hasher: Hasher,
            md5: str) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """(version tags, lineage.json, params) of the model in `folder`, from dvc.lock."""
    path = project_path(folder)
    chain = upstream(lock, path)
    if not chain:
        why = "no dvc.lock" if not lock else f"no stage in dvc.lock writes {path}"
        return {"llm_forge.lineage": f"none ({why})"}, {"model": {"path": path, "md5": md5}, "stages": {}}, {}
    stage, out = producer(lock, path)
    recorded = next(_hash_value(o) for o in lock[stage]["outs"] if o["path"] == out)
    current = md5 if out == path else hasher.path(Path(out))
    verified = recorded == current
    if not verified:
        log.warning("dvc.lock records %s for %s but the folder hashes to %s: the lineage is of an "
                    "older run (run the pipeline through `dvc repro`)", recorded, out, current)
    tags = {"llm_forge.lineage": "dvc.lock", "llm_forge.dvc_stage": stage,
            "llm_forge.lineage_verified": str(verified).lower()}
    params: dict[str, str] = {}
    for name in chain:
        for kind in ("deps", "outs"):
            for item in lock[name].get(kind) or []:
                tags[tag_key(f"dvc.{name}.{kind}.{item['path']}")] = _hash_value(item)
        for sections in (lock[name].get("params") or {}).values():
            params.update(tracking.flatten(sections or {}))
    doc = {"model": {"path": path, "md5": md5, "stage": stage, "dvc_out": out, "verified": verified},
           "stages": {name: lock[name] for name in chain}}
    return tags, doc, {tag_key(k): v for k, v in params.items()}
