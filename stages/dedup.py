"""dedup: drop exact and near-duplicate records, keeping one survivor per group.

Reads `data/decontam/` (corpus, instructions, preferences Parquet files: the cleaned records that no
evaluation item overlaps) and writes the same layout to `data/dedup/`. Every kind loses its exact
duplicates: records whose text (`io.record_text`) is equal after NFKC, casefolding and whitespace
collapsing. The corpus also loses its near duplicates, found with MinHash and LSH
(`stages.common.minhash`) over shingles that work for any script: word n-grams, or character n-grams
for CJK text, which has no spaces. Every LSH candidate pair is then verified by the exact Jaccard
similarity of the two shingle sets, so a document that only shares a paragraph with another (a
quote, a footer, an excerpt) is kept; only true near-copies go. Near-duplicate groups are the
connected components of the verified pairs (union-find). The survivor of a group is the longest
record, ties to the smallest id, so the output does not depend on input order. Writes
`reports/dedup/samples_dropped.jsonl`: dropped records with the id of the survivor they duplicate
and their measured similarity to it.

    python -m stages.dedup [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from stages.common.config import Paths, StageConfig
from stages.common.io import KINDS, Tally, atomic_dir, read_records, record_text, write_jsonl, write_records
from stages.common.minhash import near_duplicates
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.dedup")

EXACT = "exact_duplicate"
NEAR = "near_duplicate"


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


# --- the steps -------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Text as exact dedup compares it: NFKC, casefolded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def normalize_all(texts: list[str]) -> list[str]:
    """`[normalize(t) for t in texts]`, computed faster on CJK text.

    Chinese text is rarely NFKC as written only because of its fullwidth punctuation (，！？)
    and ideographic spaces, whose NFKC forms are plain ASCII. Mapping those first, over the code
    points of all texts at once, leaves most texts already in NFKC, which `is_normalized` checks
    far faster than `normalize` rewrites; the others still get the full NFKC. The result is the
    same, since those characters' NFKC forms are exactly what they are mapped to."""
    import numpy as np

    out = list(texts)
    wide = [i for i, t in enumerate(texts) if not t.isascii()]  # ASCII is NFKC already
    if wide:
        lengths = [len(texts[i]) for i in wide]
        cp = np.frombuffer("".join(texts[i] for i in wide).encode("utf-32-le", "surrogatepass"), np.uint32).copy()
        full = (cp >= 0xFF01) & (cp <= 0xFF5E)
        cp[full] -= np.uint32(0xFEE0)
        cp[cp == 0x3000] = 0x20
        mapped = cp.tobytes().decode("utf-32-le", "surrogatepass")
        at = 0
        for i, n in zip(wide, lengths):
            t = mapped[at: at + n]
            at += n
            out[i] = t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t)
    return [" ".join(t.casefold().split()) for t in out]



@dataclass
class Duplicate:
    """A record dedup removes: which survivor it duplicates, and how closely."""

    index: int
    """Position of the removed record in the input list."""
    reason: str
    """EXACT or NEAR (the `dropped` metric key)."""
    survivor: int
    """Position of the record it duplicates."""
    similarity: float
    """Exact Jaccard similarity of its shingles to the survivor's (1.0 for an exact duplicate)."""


@dataclass
class DedupResult:
    keep: list[bool]
    """One flag per input record, in input order."""
    duplicates: list[Duplicate] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    stats: dict[str, Any] = field(default_factory=dict)


def dedup_texts(texts: list[str], ids: list[str], cfg: DedupConfig, near: bool) -> DedupResult:
    """Which of `texts` to keep: exact duplicates always, near duplicates when `near`.

    The core of the stage (the benchmark calls it too); near duplicates come from
    `stages.common.minhash.near_duplicates`. Records are ranked longest first (by
    normalized text, so padding does not win), ties to the smallest id (then the raw text), and
    the best-ranked record of every duplicate group survives, so the result does not depend on
    the order of the input."""
    n_docs = len(texts)
    tally = Tally()
    tally.docs_in = n_docs
    all_norms = normalize_all(texts)
    order = sorted(range(n_docs), key=lambda i: (-len(all_norms[i]), ids[i], texts[i]))
    # Exact: the first of each normalized text in rank order survives.
    first: dict[bytes, int] = {}
    duplicates: list[Duplicate] = []
    uniq: list[int] = []  # input positions of exact survivors, in rank order
    norms: list[str] = []
    for i in order:
        norm = all_norms[i]
        s = first.setdefault(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest(), i)
        if s == i:
            uniq.append(i)
            norms.append(norm)
        else:
            duplicates.append(Duplicate(i, EXACT, s, 1.0))
    tally.drop(EXACT, len(duplicates))
    stats: dict[str, Any] = {}
    if near and len(uniq) > 1:
        found, stats = near_duplicates(norms, cfg)
        duplicates += [Duplicate(uniq[i], NEAR, uniq[root], similarity) for i, root, similarity in found]
        tally.drop(NEAR, len(found))
    keep = [True] * n_docs
    for d in duplicates:
        keep[d.index] = False
    tally.docs_out = sum(keep)
    return DedupResult(keep=keep, duplicates=duplicates, tally=tally, stats=stats)


# --- the stage -------------------------------------------------------------------------------


def run(cfg: DedupConfig, paths: Paths) -> dict[str, Any]:
    started = time.perf_counter()
    report = paths.report_dir("dedup")
    report.mkdir(parents=True, exist_ok=True)
    total = Tally()
    kinds: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    with atomic_dir(paths.dedup) as tmp:
        for kind in KINDS:
            records = read_records(paths.decontam, kind)
            texts = [record_text(kind, r) for r in records]
            ids = [str(r["id"]) for r in records]
            result = dedup_texts(texts, ids, cfg, near=cfg.near and kind == "corpus")
            result.tally.check(f"dedup {kind}")
            write_records(tmp, kind, [r for r, k in zip(records, result.keep) if k])
            total.merge(result.tally)
            kinds[kind] = {**result.tally.as_metrics(), **result.stats}
            samples.extend(_samples(kind, ids, texts, result, cfg.samples - len(samples)))
            log.info("dedup %s: %d in, %d out, dropped %s (%.0f docs/s so far)", kind, result.tally.docs_in,
                     result.tally.docs_out, dict(result.tally.dropped),
                     (total.docs_in) / max(time.perf_counter() - started, 1e-9))
    total.check("dedup")
    write_jsonl(report / "samples_dropped.jsonl", samples)
    seconds = time.perf_counter() - started
    return {
        **total.as_metrics(),
        "kinds": kinds,
        "docs_per_second": round(total.docs_in / max(seconds, 1e-9), 1),
        "near": cfg.near,
        "num_perm": cfg.num_perm,
        "threshold": cfg.threshold,
        "verify_threshold": cfg.verify_threshold,
        "word_ngram": cfg.word_ngram,
        "char_ngram": cfg.char_ngram,
    }


def _samples(kind: str, ids: list[str], texts: list[str], result: DedupResult,
             limit: int) -> list[dict[str, Any]]:
    """Up to `limit` dropped records, near duplicates first (the ones worth a look)."""
    if limit <= 0:
        return []
    chosen = sorted(result.duplicates, key=lambda d: (d.reason != NEAR, ids[d.index]))[:limit]
    return [{"kind": kind, "id": ids[d.index], "reason": d.reason, "duplicate_of": ids[d.survivor],
             "similarity": d.similarity, "text": texts[d.index][:500], "survivor_text": texts[d.survivor][:500]}
            for d in chosen]


def main(argv: list[str] | None = None) -> int:
    return run_stage("dedup", DedupConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
