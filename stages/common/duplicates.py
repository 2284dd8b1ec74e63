"""Exact and near duplicates among texts, for dedup: the normal form exact dedup compares, its
digest, and `dedup_texts`, the stage's rule over one list in one process (the reference its
shard-by-shard steps are tested against; near duplicates from `stages.common.minhash`)."""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stages.common.io import Tally
from stages.common.minhash import char_chunks, near_duplicates

EXACT = "exact_duplicate"
NEAR = "near_duplicate"


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
    lengths = np.fromiter((len(texts[i]) for i in wide), np.int64, len(wide))
    for lo, hi in char_chunks(lengths):  # a chunk's code points at a time (why: CHUNK_CHARS)
        part = wide[lo:hi]
        cp = np.frombuffer("".join(texts[i] for i in part).encode("utf-32-le", "surrogatepass"), np.uint32).copy()
        full = (cp >= 0xFF01) & (cp <= 0xFF5E)
        cp[full] -= np.uint32(0xFEE0)
        cp[cp == 0x3000] = 0x20
        mapped = cp.tobytes().decode("utf-32-le", "surrogatepass")
        at = 0
        for i, n in zip(part, lengths[lo:hi].tolist()):
            t = mapped[at: at + n]
            at += n
            out[i] = t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t)
    return [" ".join(t.casefold().split()) for t in out]


def digest(norm: str) -> bytes:
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


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


def dedup_texts(texts: list[str], ids: list[str], cfg: Any, near: bool) -> DedupResult:
    """Which of `texts` to keep: exact duplicates always, near duplicates when `near`.

    The core of the stage (the benchmark calls it too); near duplicates come from
    `stages.common.minhash.near_duplicates`. Records are ranked longest first (by
    normalized text, so padding does not win), ties to the smallest id (then the raw text), and
    the best-ranked record of every duplicate group survives, so the result does not depend on
    the order of the input."""
    n_docs = len(texts)
    all_norms = normalize_all(texts)
    order = sorted(range(n_docs), key=lambda i: (-len(all_norms[i]), ids[i], texts[i]))
    # Exact: the first of each normalized text in rank order survives.
    first: dict[bytes, int] = {}
    duplicates: list[Duplicate] = []
    uniq: list[int] = []  # input positions of exact survivors, in rank order
    norms: list[str] = []
    for i in order:
        norm = all_norms[i]
        s = first.setdefault(digest(norm), i)
        if s == i:
            uniq.append(i)
            norms.append(norm)
        else:
            duplicates.append(Duplicate(i, EXACT, s, 1.0))
    stats: dict[str, Any] = {}
    if near and len(uniq) > 1:
        found, stats = near_duplicates(norms, cfg)
        duplicates += [Duplicate(uniq[i], NEAR, uniq[root], similarity) for i, root, similarity in found]
    return result_of(n_docs, duplicates, stats)


def result_of(n_docs: int, duplicates: list[Duplicate], stats: dict[str, Any]) -> DedupResult:
    """The kept flags and the tally of `n_docs` records less `duplicates`."""
    keep = [True] * n_docs
    for d in duplicates:
        keep[d.index] = False
    return DedupResult(keep=keep, duplicates=duplicates, tally=tally_of(n_docs, Counter(d.reason for d in duplicates)),
                       stats=stats)


def tally_of(n_docs: int, dropped: Mapping[str, int]) -> Tally:
    """The tally of `n_docs` records of which `dropped` (reason -> count, reasons in the order they
    first occur) were dropped."""
    tally = Tally()
    tally.docs_in = n_docs
    for reason, n in dropped.items():
        tally.drop(reason, n)
    tally.docs_out = n_docs - sum(dropped.values())
    return tally
