"""dedup: drop exact and near-duplicate records, keeping one survivor per group.

Reads the shards of `data/decontam/`; writes the same shards less their duplicates to
`data/dedup/`, and dropped records with the survivor they duplicate and their similarity to
`reports/dedup/samples_dropped.jsonl` (README: "The data stages").

    python -m stages.dedup [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from stages.common.config import Paths, StageConfig
from stages.common.datastage import DataStage, checked
from stages.common.duplicates import EXACT, NEAR, Duplicate, dedup_texts, digest, normalize_all, tally_of
from stages.common.io import Tally, record_text, write_jsonl
from stages.common.minhash import lsh_bands, pairs_in_band, shingle_texts, signatures, unique_pairs, verify
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

    records = read_shard(task.source).to_pylist()
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


def _band(path: Path, band: int) -> Any:
    """Row `band` of the band keys at `path`, read from the file (not mapped: a mapped file's
    pages would stay resident)."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        f.seek(band * shape[1] * dtype.itemsize, 1)
        return np.fromfile(f, dtype, count=shape[1])


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


@dataclass
class KindResult:
    """Step 2's answer for one kind: its duplicates (positions in the kind's records, shard after
    shard), their tally, the LSH figures, and where to read a record's id."""

    duplicates: list[Duplicate]
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
    them alone: rank decides nothing elsewhere), and every per-record value is a numpy column, so
    a record costs tens of bytes here, not a Python object's hundreds."""
    import numpy as np

    files = [t.out("sketch").with_suffix(".npz") for t in tasks]
    per_shard = [np.load(f)["lengths"] for f in files]
    lengths = np.concatenate(per_shard) if files else np.zeros(0, np.int32)
    starts = np.cumsum([0] + [x.size for x in per_shard[:-1]]).astype(np.int64)
    del per_shard
    n_docs = len(lengths)
    # Exact: records with equal digests, each group's best-ranked record survives.
    digests = (np.concatenate([np.load(f)["digests"] for f in files]) if files
               else np.zeros((0, 16), np.uint8)).view("<u8").reshape(n_docs, 2)
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
    duplicates: list[Duplicate] = []
    dropped = np.zeros(n_docs, bool)
    if members.size:
        ranked = _rank(tasks, starts, lengths, members)
        rank_of = {int(r): k for k, r in enumerate(ranked.tolist())}
        by_group: dict[int, list[int]] = {}
        for g, r in sorted(zip(group.tolist(), members.tolist()), key=lambda x: (x[0], rank_of[x[1]])):
            by_group.setdefault(g, []).append(r)
        for best, *rest in by_group.values():
            duplicates += [Duplicate(r, EXACT, best, 1.0) for r in rest]
            dropped[rest] = True
    stats: dict[str, Any] = {}
    if cfg.near and kind == "corpus" and n_docs - len(duplicates) > 1:
        found, stats = _near(np.flatnonzero(~dropped), lengths, tasks, starts, files, cfg)
        duplicates += [Duplicate(i, NEAR, root, similarity) for i, root, similarity in found]
    return KindResult(duplicates, tally_of(n_docs, duplicates), stats, tasks, starts)


def _near(survivors: Any, lengths: Any, tasks: list[ShardTask], starts: Any, files: list[Path],
          cfg: DedupConfig) -> tuple[list[tuple[int, int, float]], dict[str, Any]]:
    """`near_duplicates` over the exact survivors (positions), from the shards' band keys: the LSH
    buckets band by band (one band of every record in memory at a time); the records in a bucket
    with another are ranked, shingled again from their shards' text, each candidate pair verified
    by exact Jaccard, groups by connected components (the best-ranked record of each survives)."""
    import numpy as np

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    counts = [np.load(f)["counts"] for f in files]
    has = np.concatenate(counts) > 0
    key_row = np.cumsum(has, dtype=np.int64) - 1  # a record's row among those with shingles
    banded = survivors[has[survivors]]  # survivors that have shingles (a text without words has none)
    rows_of = key_row[banded]
    del key_row, has
    found = [pairs_in_band(np.concatenate([_band(_keys_path(f), b) for f in files])[rows_of], cfg.max_bucket)
             for b in range(bands)]
    del rows_of
    pairs = banded[unique_pairs(found, banded.size)]
    del banded
    # The candidates in rank order: pairs and groups over rank positions, as near_duplicates has them.
    ranked = _rank(tasks, starts, lengths, np.unique(pairs))
    rank_of = np.argsort(ranked)  # the rank of each candidate, candidates in position order
    pairs = rank_of[np.searchsorted(np.sort(ranked), pairs)] if pairs.size else pairs
    pairs = unique_pairs([pairs], max(ranked.size, 1))
    # The candidates' shingle sets, one shard at a time.
    sets: dict[int, Any] = {}
    shard_of = np.searchsorted(starts, ranked, side="right") - 1
    for s in np.unique(shard_of).tolist():
        at = np.flatnonzero(shard_of == s)
        records = read_shard(tasks[s].source).take((ranked[at] - starts[s]).tolist()).to_pylist()
        shingles, sizes = shingle_texts(normalize_all([record_text(tasks[s].kind, r) for r in records]),
                                        cfg.word_ngram, cfg.char_ngram, cfg.cjk_share)
        for r, part in zip(at.tolist(), np.split(shingles, np.cumsum(sizes)[:-1])):
            sets[r] = np.unique(part)
    dropped, checked, confirmed = verify(pairs, sets.__getitem__, ranked.size, cfg.verify_threshold)
    named = [(int(ranked[i]), int(ranked[root]), similarity) for i, root, similarity in dropped]
    return named, {"bands": bands, "rows": rows, "lsh_flagged": int(ranked.size),
                   "candidate_pairs": int(len(pairs)), "checked_pairs": checked, "confirmed_pairs": confirmed}


def one_shard(kind: str, task: ShardTask, cfg: DedupConfig) -> KindResult:
    """Step 2 for a kind of one shard: `dedup_texts` over it in this process (no sketch to write
    and read back; rensa's LSH index flags the documents whose signatures are read back)."""
    import numpy as np

    records = read_shard(task.source).to_pylist()
    ids = [str(r["id"]) for r in records]
    result = dedup_texts([record_text(kind, r) for r in records], ids, cfg, near=cfg.near and kind == "corpus")
    return KindResult(result.duplicates, result.tally, result.stats, [task], np.zeros(1, np.int64))


def run(cfg: DedupConfig, paths: Paths, data: DataConfig) -> dict[str, Any]:
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
    chosen: list[tuple[str, Duplicate, KindResult]] = []
    for kind in stage.kinds:
        mine = [t for t in stage.tasks if t.kind == kind]
        result = one_shard(kind, mine[0], cfg) if len(mine) == 1 else dedup_kind(kind, mine, cfg)
        for d in result.duplicates:
            shard, pos = result.where(d.index)
            drop.setdefault(f"{kind}/{shard}", []).append(pos)
        tallies[kind], stats[kind] = result.tally, result.stats
        named = zip((d.reason != NEAR for d in result.duplicates), result.ids([d.index for d in result.duplicates]),
                    result.duplicates)
        shown = [d for *_, d in sorted(named, key=lambda x: x[:2])][: cfg.samples - len(chosen)]
        chosen += [(kind, d, result) for d in shown]
        log.info("dedup %s: %d in, %d out, dropped %s", kind, result.tally.docs_in, result.tally.docs_out,
                 dict(result.tally.dropped))

    show: dict[str, list[int]] = {}
    for kind, d, result in chosen:
        for i in (d.index, d.survivor):
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

    write_jsonl(report / "samples_dropped.jsonl", [
        {"kind": kind, "id": result.ids([d.index])[0], "reason": d.reason,
         "duplicate_of": result.ids([d.survivor])[0], "similarity": d.similarity,
         "text": text(kind, result, d.index), "survivor_text": text(kind, result, d.survivor)}
        for kind, d, result in chosen])
    metrics = stage.metrics(tallies, **stats)
    return {**metrics, "docs_per_second": round(metrics["docs_in"] / max(time.perf_counter() - started, 1e-9), 1),
            **cfg.model_dump(include={"near", "num_perm", "threshold", "verify_threshold", "word_ngram",
                                      "char_ngram"})}


def main(argv: list[str] | None = None) -> int:
    return run_stage("dedup", DedupConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
