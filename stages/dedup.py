"""dedup: drop exact and near-duplicate records, keeping one survivor per group.

Reads the shards of `data/decontam/`; writes the same shards less their duplicates to
`data/dedup/`, and dropped records with the survivor they duplicate and their similarity to
`reports/dedup/samples_dropped.jsonl` (README: "The data stages").

    python -m stages.dedup [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from stages.common.config import Paths, StageConfig
from stages.common.datastage import DataStage, checked
from stages.common.duplicates import EXACT, NEAR, Duplicate, dedup_texts, digest, normalize_all, tally_of
from stages.common.io import TEXT_FIELDS, Tally, record_text, write_jsonl
from stages.common.minhash import distinct, lsh_bands, pairs_in_band, shingle_texts, signatures, unique_pairs, verify
from stages.common.runner import run_stage
from stages.common.shards import DataConfig, ShardTask, read_shard, write_array, write_arrays, write_table

log = logging.getLogger("llm_forge.dedup")

READS = {"data": DataConfig}  # how the shards run (no dvc.yaml param: it never changes the output)


class DedupConfig(StageConfig):
    near: bool
    """Also remove near-duplicate corpus documents (MinHash + LSH + verification); exact dedup always runs."""
    num_perm: int = Field(ge=8, le=1024)
    """MinHash permutations at most; the signature is bands x rows of them (the LSH layout)."""
    threshold: float = Field(gt=0.0, lt=1.0)
    """LSH threshold: picks bands x rows so that pairs more similar than this become candidates."""
    verify_threshold: float = Field(gt=0.0, le=1.0)
    """Exact Jaccard similarity of the shingle sets a candidate pair needs to count as duplicates."""
    word_ngram: int = Field(ge=1)
    """Shingle size, in words, for text written with spaces."""
    char_ngram: int = Field(ge=1)
    """Shingle size, in characters, for CJK text (Chinese, Japanese, Korean)."""
    cjk_share: float = Field(ge=0.0, le=1.0)
    """A document whose tokens are at least this share CJK characters is shingled by characters."""
    seed: int
    """Seed of the MinHash permutations."""
    max_bucket: int = Field(ge=2)
    """An LSH bucket with more documents than this is checked as a chain, not all pairs."""
    batch_size: int = Field(ge=1)
    """Documents shingled and sketched per batch (bounds memory; one progress line per batch)."""
    samples: int = Field(ge=0)
    """Dropped records written to `samples_dropped.jsonl`."""

    @model_validator(mode="after")
    def _threshold_below_verify(self) -> DedupConfig:
        if self.threshold > self.verify_threshold:
            raise ValueError("threshold must not exceed verify_threshold: LSH would miss pairs the "
                             "verification accepts")
        return self


# --- the steps, shard by shard (README: "The data stages") ---------------------------------


def sketch_shard(task: ShardTask, cfg: DedupConfig) -> dict[str, Any]:
    """Step 1, one shard of a kind that has several: each record's normalized length and exact-text
    digest (`sketch/<kind>/part-N.npz`), and for the corpus its shingle count and LSH band keys, a
    band per row (`part-N.keys.npy`, read a band at a time by step 2). The shingles are not kept:
    step 2 shingles again the few records whose band keys collide."""
    import numpy as np

    records = read_shard(task.source, columns=TEXT_FIELDS[task.kind]).to_pylist()  # the text alone
    norms = normalize_all([record_text(task.kind, r) for r in records])
    arrays = {"digests": np.frombuffer(b"".join(digest(t) for t in norms), np.uint8).reshape(-1, 16),
              "lengths": np.fromiter(map(len, norms), np.int32, len(norms))}
    path = task.out("sketch").with_suffix(".npz")
    if cfg.near and task.kind == "corpus":
        _, arrays["counts"], keys = signatures(norms, cfg)
        write_array(_keys_path(path), np.ascontiguousarray(keys.T))
    write_arrays(path, arrays)
    return {"docs_in": len(records)}


def _keys_path(sketch: Path) -> Path:
    return sketch.with_suffix(".keys.npy")


def _band(path: Path, band: int, out: Any) -> int:
    """Row `band` of the band keys at `path` into the start of `out`, read from the file (not
    mapped: a mapped file's pages would stay resident); returns its length."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        f.seek(band * shape[1] * dtype.itemsize, 1)
        f.readinto(memoryview(out[: shape[1]].view(np.uint8)))
        return shape[1]


def _gather(files: list[Path], name: str, out: Any) -> Any:
    """Array `name` of each sketch in `files`, one after the other into `out` (no list of parts
    and no second copy to concatenate them)."""
    import numpy as np

    at = 0
    for f in files:
        part = np.load(f)[name]
        out[at: at + len(part)] = part
        at += len(part)
    return out


@dataclass(frozen=True)
class Plan:
    """What step 3 does with every shard: the positions it drops, the texts it shows."""

    drop: dict[str, list[int]]
    show: dict[str, list[int]]


def filter_shard(task: ShardTask, plan: Plan) -> dict[str, Any]:
    """Step 3, one shard: its records less the dropped ones to its `dedup` output; the texts the
    report shows."""
    import pyarrow as pa

    table = read_shard(task.source)
    name = f"{task.kind}/{task.index}"
    keep = [True] * table.num_rows
    for i in plan.drop.get(name, []):
        keep[i] = False
    kept = table.filter(pa.array(keep, pa.bool_()))
    write_table(task.out("dedup"), kept)
    rows = table.take(pa.array(plan.show.get(name, []), pa.int64())).to_pylist()
    return {"docs_in": table.num_rows, "docs_out": kept.num_rows, "dropped": {},
            "texts": {str(i): record_text(task.kind, r)[:500] for i, r in zip(plan.show.get(name, []), rows)}}


@dataclass(frozen=True)
class Dropped:
    """A kind's duplicates as numpy columns, a row per dropped record (a Python object per row
    would cost several times the step's own columns)."""

    index: Any
    """Position of the dropped record in the kind's records, shard after shard (int64)."""
    survivor: Any
    """Position of the record it duplicates (int64)."""
    similarity: Any
    """Exact Jaccard similarity of their shingles (float64; 1.0 for an exact duplicate)."""
    near: Any
    """True for a near duplicate, False for an exact one."""

    @classmethod
    def of(cls, duplicates: list[Duplicate]) -> Dropped:
        import numpy as np

        return cls(np.array([d.index for d in duplicates], np.int64),
                   np.array([d.survivor for d in duplicates], np.int64),
                   np.array([d.similarity for d in duplicates], np.float64),
                   np.array([d.reason == NEAR for d in duplicates], bool))

    @classmethod
    def join(cls, *parts: Dropped) -> Dropped:
        import numpy as np

        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def reason(self, k: int) -> str:
        return NEAR if self.near[k] else EXACT

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class KindResult:
    """Step 2's answer for one kind: its duplicates, their tally, the LSH figures, and where to
    read a record's id."""

    duplicates: Dropped
    tally: Tally
    stats: dict[str, Any]
    tasks: list[ShardTask]
    starts: Any
    """Position of each shard's first record (numpy), for `where`."""

    def where(self, i: int) -> tuple[int, int]:
        """(shard, position in it) of record i."""
        import numpy as np

        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def ids(self, records: Any) -> list[str]:
        """The ids of `records` (positions), read from their shards."""
        return [str(v) for v in _column(self.tasks, self.starts, records, "id")]


def _column(tasks: list[ShardTask], starts: Any, records: Any, name: str) -> list[Any]:
    """Column `name` of `records` (positions in the kind, shard after shard), in their order,
    reading only the shards that hold them."""
    import numpy as np

    records = np.asarray(records, np.int64)
    out: list[Any] = [None] * records.size
    shard_of = np.searchsorted(starts, records, side="right") - 1
    for s in np.unique(shard_of).tolist():
        at = np.flatnonzero(shard_of == s)
        values = read_shard(tasks[s].source, columns=[name]).column(name).take((records[at] - starts[s]).tolist())
        for k, v in zip(at.tolist(), values.to_pylist()):
            out[k] = v
    return out


def _rank(tasks: list[ShardTask], starts: Any, lengths: Any, records: Any) -> Any:
    """`records` (positions) in the order `dedup_texts` ranks them: longest normalized text first,
    then the smallest id, then the earliest position (where `dedup_texts` compares raw text: ids
    are unique after collect)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    records = np.asarray(records, np.int64)
    table = pa.table({"length": lengths[records], "id": pa.array(_column(tasks, starts, records, "id"), pa.string()),
                      "at": records})
    order = pc.sort_indices(table, sort_keys=[("length", "descending"), ("id", "ascending"), ("at", "ascending")])
    return records[order.to_numpy()]


def dedup_kind(kind: str, tasks: list[ShardTask], cfg: DedupConfig) -> KindResult:
    """Step 2, one kind: the survivors of all its shards, as `dedup_texts` picks them, from the
    shards' sketches. Only records that share a digest or a band key are ranked (ids read for
    them alone: rank decides nothing elsewhere); every per-record value, the duplicates included,
    is a numpy column, and the candidates' shingle sets wait on disk, so a record costs tens of
    bytes here, not a Python object's hundreds."""
    import numpy as np

    files = [t.out("sketch").with_suffix(".npz") for t in tasks]
    per_shard = [np.load(f)["lengths"] for f in files]
    lengths = np.concatenate(per_shard) if files else np.zeros(0, np.int32)
    starts = np.cumsum([0] + [x.size for x in per_shard[:-1]]).astype(np.int64)
    del per_shard
    n_docs = len(lengths)
    # Exact: records with equal digests, each group's best-ranked record survives.
    digests = _gather(files, "digests", np.empty((n_docs, 16), np.uint8)).view("<u8").reshape(n_docs, 2)
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    ordered = digests[order]
    del digests
    same = (ordered[1:] == ordered[:-1]).all(axis=1)  # record k+1 (in digest order) repeats record k
    del ordered
    grouped = np.zeros(n_docs, bool)
    grouped[1:] |= same
    grouped[:-1] |= same
    group = np.cumsum(np.concatenate(([True], ~same)))[grouped]  # a group number per grouped record
    members = order[grouped]
    del order, same, grouped
    exact = _exact(tasks, starts, lengths, members, group)
    del members, group
    dropped = np.zeros(n_docs, bool)
    dropped[exact.index] = True
    near = Dropped.of([])
    stats: dict[str, Any] = {}
    if cfg.near and kind == "corpus" and n_docs - len(exact) > 1:
        near, stats = _near(dropped, lengths, tasks, starts, files, cfg)
    duplicates = Dropped.join(exact, near)
    return KindResult(duplicates, tally_of(n_docs, {EXACT: len(exact), NEAR: len(near)}), stats, tasks, starts)


def _exact(tasks: list[ShardTask], starts: Any, lengths: Any, members: Any, group: Any) -> Dropped:
    """The exact duplicates among `members` (positions, with the number of their group of equal
    digests): every member but its group's best-ranked, group after group, each in rank order."""
    import numpy as np

    ranked = _rank(tasks, starts, lengths, members) if members.size else members
    rank = np.argsort(ranked)[np.searchsorted(np.sort(ranked), members)]  # each member's rank
    by_group = np.lexsort((rank, group))
    members, group = members[by_group], group[by_group]
    best = np.concatenate(([True], group[1:] != group[:-1])) if members.size else np.zeros(0, bool)
    survivor = members[best][np.cumsum(best) - 1]
    rest = ~best
    return Dropped(members[rest], survivor[rest], np.ones(int(rest.sum())), np.zeros(int(rest.sum()), bool))


def _near(dropped: Any, lengths: Any, tasks: list[ShardTask], starts: Any, files: list[Path],
          cfg: DedupConfig) -> tuple[Dropped, dict[str, Any]]:
    """`near_duplicates` over the exact survivors (records not `dropped`), from the shards' band
    keys: the LSH buckets band by band (one band of every record in memory at a time); the records
    in a bucket with another are ranked, shingled again from their shards' text, each candidate
    pair verified by exact Jaccard, groups by connected components (the best-ranked record of each
    survives)."""
    import numpy as np

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    has = _gather(files, "counts", np.empty(len(dropped), np.int32)) > 0
    key_row = np.cumsum(has, dtype=np.int64) - 1  # a record's row among those with shingles
    banded = np.flatnonzero(~dropped & has)  # survivors that have shingles (a text without words has none)
    rows_of = key_row[banded]
    del key_row
    keys = np.empty(int(has.sum()), np.uint64)  # one band of every record's keys, refilled band by band
    del has
    found = []
    for b in range(bands):
        at = 0
        for f in files:
            at += _band(_keys_path(f), b, keys[at:])
        found.append(pairs_in_band(keys[rows_of], cfg.max_bucket))
    del rows_of, keys
    pairs = banded[unique_pairs(found, banded.size)]
    del banded, found
    # The candidates in rank order: pairs and groups over rank positions, as near_duplicates has them.
    ranked = _rank(tasks, starts, lengths, np.unique(pairs))
    rank_of = np.argsort(ranked)  # the rank of each candidate, candidates in position order
    pairs = rank_of[np.searchsorted(np.sort(ranked), pairs)] if pairs.size else pairs
    del rank_of
    pairs = unique_pairs([pairs], max(ranked.size, 1))
    # The candidates' shingle sets, one shard at a time, to a file beside the sketches, read back
    # a set at a time as a pair needs it: all in memory at once they would outweigh the rest.
    first = np.zeros(ranked.size, np.int64)  # a set's first hash in the file
    size = np.zeros(ranked.size, np.int64)
    shard_of = np.searchsorted(starts, ranked, side="right") - 1
    with tempfile.TemporaryFile(dir=files[0].parent) as spill:
        written = 0
        for s in np.unique(shard_of).tolist():
            at = np.flatnonzero(shard_of == s)
            records = read_shard(tasks[s].source).take((ranked[at] - starts[s]).tolist()).to_pylist()
            shingles, sizes = shingle_texts(normalize_all([record_text(tasks[s].kind, r) for r in records]),
                                            cfg.word_ngram, cfg.char_ngram, cfg.cjk_share)
            del records
            for r, part in zip(at.tolist(), np.split(shingles, np.cumsum(sizes)[:-1])):
                unique = distinct(part)
                first[r], size[r] = written, unique.size
                spill.write(unique.tobytes())
                written += unique.size
            del shingles
        spill.flush()
        del shard_of

        def shingle_set(r: int) -> Any:
            return np.frombuffer(os.pread(spill.fileno(), int(size[r]) * 8, int(first[r]) * 8), np.uint64)

        found_near, checked, confirmed = verify(pairs, shingle_set, ranked.size, cfg.verify_threshold)
    near = np.array([(i, root) for i, root, _ in found_near], np.int64).reshape(-1, 2)
    dropped_near = Dropped(ranked[near[:, 0]], ranked[near[:, 1]],
                           np.array([similarity for *_, similarity in found_near], np.float64),
                           np.ones(len(found_near), bool))
    return dropped_near, {"bands": bands, "rows": rows, "lsh_flagged": int(ranked.size),
                          "candidate_pairs": int(len(pairs)), "checked_pairs": checked, "confirmed_pairs": confirmed}


def one_shard(kind: str, task: ShardTask, cfg: DedupConfig) -> KindResult:
    """Step 2 for a kind of one shard: `dedup_texts` over it in this process (no sketch to write
    and read back; rensa's LSH index flags the documents whose signatures are read back)."""
    import numpy as np

    records = read_shard(task.source, columns=["id", *TEXT_FIELDS[kind]]).to_pylist()
    ids = [str(r["id"]) for r in records]
    result = dedup_texts([record_text(kind, r) for r in records], ids, cfg, near=cfg.near and kind == "corpus")
    return KindResult(Dropped.of(result.duplicates), result.tally, result.stats, [task], np.zeros(1, np.int64))


def run(cfg: DedupConfig, paths: Paths, data: DataConfig) -> dict[str, Any]:
    import numpy as np

    started = time.perf_counter()
    report = paths.report_dir("dedup")
    report.mkdir(parents=True, exist_ok=True)
    stage = DataStage("dedup", paths.decontam, {"dedup": paths.dedup}, data)
    key = cfg.model_dump_json(exclude={"samples"})
    shards = Counter(t.kind for t in stage.tasks)
    stage.run(sketch_shard, cfg, key, tasks=[t for t in stage.tasks if shards[t.kind] > 1], step="sketch")

    tallies: dict[str, Tally] = {}
    stats: dict[str, Any] = {}
    drop: dict[str, list[int]] = {}
    chosen: list[tuple[str, int, KindResult, str, str]] = []  # (kind, row of its duplicates, result, ids)
    for kind in stage.kinds:
        mine = [t for t in stage.tasks if t.kind == kind]
        result = one_shard(kind, mine[0], cfg) if len(mine) == 1 else dedup_kind(kind, mine, cfg)
        dup = result.duplicates
        shard = np.searchsorted(result.starts, dup.index, side="right") - 1
        pos = dup.index - result.starts[shard]
        _, first = np.unique(shard, return_index=True)
        for s in shard[np.sort(first)].tolist():  # the shards in the order their first duplicate comes
            drop[f"{kind}/{s}"] = pos[shard == s].tolist()
        tallies[kind], stats[kind] = result.tally, result.stats
        ids, near = result.ids(dup.index), dup.near.tolist()
        shown = sorted(range(len(dup)), key=lambda k: (not near[k], ids[k]))[: cfg.samples - len(chosen)]
        chosen += [(kind, k, result, ids[k], s) for k, s in zip(shown, result.ids(dup.survivor[shown]))]
        log.info("dedup %s: %d in, %d out, dropped %s", kind, result.tally.docs_in, result.tally.docs_out,
                 dict(result.tally.dropped))

    show: dict[str, list[int]] = {}
    for kind, k, result, *_ in chosen:
        for i in (int(result.duplicates.index[k]), int(result.duplicates.survivor[k])):
            shard, pos = result.where(i)
            show.setdefault(f"{kind}/{shard}", []).append(pos)
    plan = Plan({k: sorted(v) for k, v in drop.items()}, {k: sorted(set(v)) for k, v in show.items()})
    written = stage.run(filter_shard, plan, json.dumps([key, plan.drop, plan.show]))
    checked(tallies, stage.tallies(written), "dedup")
    texts = {f"{t.kind}/{t.index}": r["texts"] for t, r in zip(stage.tasks, written)}
    stage.publish()

    def text(kind: str, result: KindResult, i: int) -> str:
        shard, pos = result.where(i)
        return texts[f"{kind}/{shard}"][str(pos)]

    def sample(kind: str, k: int, result: KindResult, id_: str, survivor_id: str) -> dict[str, Any]:
        dup = result.duplicates
        index, survivor = int(dup.index[k]), int(dup.survivor[k])
        return {"kind": kind, "id": id_, "reason": dup.reason(k),
                "duplicate_of": survivor_id, "similarity": float(dup.similarity[k]),
                "text": text(kind, result, index), "survivor_text": text(kind, result, survivor)}

    write_jsonl(report / "samples_dropped.jsonl", [sample(*c) for c in chosen])
    metrics = stage.metrics(tallies, **stats)
    return {**metrics, "docs_per_second": round(metrics["docs_in"] / max(time.perf_counter() - started, 1e-9), 1),
            **cfg.model_dump(include={"near", "num_perm", "threshold", "verify_threshold", "word_ngram",
                                      "char_ngram"})}


def main(argv: list[str] | None = None) -> int:
    return run_stage("dedup", DedupConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
