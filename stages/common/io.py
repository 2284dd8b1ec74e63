"""File helpers every stage shares: atomic output folders, document Parquet files, metrics.

Stages talk only through files. A stage builds its output in a temporary sibling folder and
renames it into place when it has finished, so a crashed stage never leaves a half-written
output that DVC could cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.common.atomic import atomic_file
from stages.common.shards import kind_dir, read_shard, shard_path, shard_paths, write_table

# The three kinds of data the pipeline carries, each a folder of Parquet shards in every data
# folder (`stages.common.shards`).
# `corpus` feeds pretraining, `instructions` SFT (and PPO prompts), `preferences` the reward model.
KINDS = ("corpus", "instructions", "preferences")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())]),
    "instructions": pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("messages", pa.list_(MESSAGE))]
    ),
    "preferences": pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("split", pa.string()),  # the part of the data the pair belongs to (stages/common/preferences.py)
        ]
    ),
}
# Text fields of each kind that cleaning rules look at (messages: every message's content).
TEXT_FIELDS = {"corpus": ("text",), "instructions": ("messages",), "preferences": ("prompt", "chosen", "rejected")}


def content_id(*parts: str) -> str:
    """A stable id for a record whose source has none: a hash of its content."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def id_hash(record_id: str, salt: str) -> float:
    """A salted hash of an id in [0, 1): stable when other records are added or removed."""
    h = hashlib.blake2b(f"{salt}\x00{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def is_val(record_id: str, salt: str, fraction: float) -> bool:
    """Held out or not, by a salted hash of the id (every stage splits this way)."""
    return id_hash(record_id, salt) < fraction


def record_text(kind: str, record: Mapping[str, Any]) -> str:
    """All of a record's text in one string, for hashing, dedup and checks."""
    if kind == "instructions":
        return "\n\n".join(m["content"] for m in record["messages"])
    return "\n\n".join(record[f] for f in TEXT_FIELDS[kind])


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`.

    On any failure `final` is left as it was and the temporary folder is removed; an OSError
    (disk full, read-only folder) leaves with `err.output = final`, so the runner can name the
    folder it could not write. A process killed outright cannot clean up: its temporary folder
    (named with its pid) is removed by the next run once that pid is gone.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except OSError as err:
        _naming(err, final)
        raise
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            _naming(err, final)
        raise
    try:
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _naming(err, final)
        raise


def _naming(err: OSError, final: Path) -> None:
    if getattr(err, "output", None) is None:  # the innermost folder names the failure
        err.output = final  # type: ignore[attr-defined]


def remove_stale(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>-*`)
    that a killed run left behind; a folder of a process that is still running is kept."""
    removed = []
    for kind in ("tmp", "old"):
        for path in Path(final).parent.glob(f".{Path(final).name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[1].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a killed process whose parent died unreaped is a
    zombie: it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def records_table(kind: str, records: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> pa.Table:
    """`records` of `kind` as a table: the kind's schema plus the extra string columns the
    records carry or `extra` names (clean adds `lang` to the corpus; naming it keeps the column
    when there is no record)."""
    schema = SCHEMAS[kind]
    for name in dict.fromkeys([*extra, *(records[0] if records else ())]):
        if name in schema.names:
            continue
        schema = schema.append(pa.field(name, pa.string()))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in records], schema=schema)


def record_bytes(kind: str, record: Mapping[str, Any]) -> int:
    """The UTF-8 size of a record's text: what a shard's size is counted in."""
    return len(record_text(kind, record).encode("utf-8", "surrogatepass"))


def write_records(folder: Path, kind: str, records: list[dict[str, Any]], extra: tuple[str, ...] = (),
                  index: int | None = None) -> Path:
    """Write `records` of `kind` as shard `index` of `folder/<kind>/`; without an index, as the
    kind's only shard (any other shard of it is removed)."""
    if index is None:
        shutil.rmtree(kind_dir(folder, kind), ignore_errors=True)
    return write_table(shard_path(folder, kind, index or 0), records_table(kind, records, extra))


def read_records(folder: Path, kind: str) -> list[dict[str, Any]]:
    """Every record of `kind` in `folder`, all shards in order (for the small kinds and the
    stages that need them whole); a folder without that kind holds none."""
    return [r for path in shard_paths(folder, kind) for r in read_shard(path).to_pylist()]


@dataclass(frozen=True)
class Drop:
    """A record a stage did not pass on, and why: every reader, rule and filter returns this one
    type. `reason` is a stable snake_case key (it becomes a `dropped` metric), `detail` says where
    or by how much, for the quarantine and the logs."""

    reason: str
    detail: str = ""


class Tally:
    """Counts what a data stage took in, let out and dropped (reason -> count).

    Every data stage reports `docs_in == docs_out + sum(dropped)`; `check()` enforces it so a
    record can never disappear without a reason.
    """

    def __init__(self) -> None:
        self.docs_in = 0
        self.docs_out = 0
        self.dropped: Counter[str] = Counter()

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] += n

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Tally:
        """The tally `as_metrics` described (a shard's result, back in the stage's process)."""
        tally = cls()
        tally.docs_in, tally.docs_out = int(metrics["docs_in"]), int(metrics["docs_out"])
        tally.dropped.update(metrics["dropped"])
        return tally

    def merge(self, other: Tally) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.dropped.update(other.dropped)

    def check(self, where: str) -> None:
        lost = self.docs_in - self.docs_out - sum(self.dropped.values())
        if lost:
            raise AssertionError(f"{where}: {lost} records unaccounted for (in {self.docs_in}, "
                                 f"out {self.docs_out}, dropped {dict(self.dropped)})")

    def as_metrics(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out,
                "dropped": dict(sorted(self.dropped.items()))}


QUARANTINE_FIELDS = ("id", "source", "reason", "detail", "record")


def quarantine_row(record: Mapping[str, Any], drop: Drop) -> dict[str, Any]:
    """A dropped record as a quarantine row: where it came from, why it went, the record as JSON."""
    return {"id": record.get("id"), "source": record.get("source"), "reason": drop.reason, "detail": drop.detail,
            "record": json.dumps(dict(record), ensure_ascii=False, default=str)}


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([(name, pa.string()) for name in QUARANTINE_FIELDS]))


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
