"""MinHash near-duplicate detection for `dedup`: shingles, signatures, LSH buckets, verification.

Shingles work for any script: word n-grams, or character n-grams for CJK text, which has no
spaces (the CJK ranges of `stages.common.text`). Signatures and the LSH index are rensa's
R-MinHash; the candidate pairs of every LSH band are listed here and verified by the exact
Jaccard similarity of the two shingle sets, and the verified pairs are joined into groups by
union-find. `near_duplicates` is the entry point; everything runs on numpy arrays of a whole
batch at once. No files.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from itertools import chain
from typing import Any

from stages.common.text import CJK, CJK_RANGES

log = logging.getLogger("llm_forge.dedup")

TOKEN_RE = re.compile(f"[{CJK}]|[^\\W{CJK}]+")
"""A token of spaced text: a run of word characters, or one CJK character."""
_WORD_CHAR_RE = re.compile(f"[^\\W{CJK}]")
_CJK_CHAR_RE = re.compile(f"[{CJK}]")


@functools.cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve best fits `threshold`: the
    least false-positive plus false-negative area (the rule datasketch uses)."""
    import numpy as np

    xs = np.linspace(0.0, 1.0, 501)
    below = xs < threshold
    best = (float("inf"), 1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - xs**r) ** b
            err = np.trapezoid(np.where(below, p, 0.0), xs) + np.trapezoid(np.where(below, 0.0, 1.0 - p), xs)
            if err < best[0]:
                best = (err, b, r)
    return best[1], best[2]


def fmix64(x: Any) -> Any:
    """MurmurHash3's 64-bit finalizer over a uint64 array: spreads the bits of combined hashes."""
    import numpy as np

    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


@functools.lru_cache(maxsize=1)
def _char_classes() -> Any:
    """uint8 per code point: 2 a CJK character, 1 another word character, 0 anything else; in the
    BMP taken from the token regex itself, so both ways of tokenizing agree, and beyond it only
    the CJK extensions count (emoji are not words). A table over every code point lets a text's
    classes be looked up in one pass."""
    import numpy as np

    bmp = "".join(map(chr, range(0x10000)))
    table = np.zeros(0x110000, np.uint8)
    table[[m.start() for m in _WORD_CHAR_RE.finditer(bmp)]] = 1
    table[[m.start() for m in _CJK_CHAR_RE.finditer(bmp)]] = 2
    for lo, hi in CJK_RANGES:
        if lo > 0xFFFF:
            table[lo: hi + 1] = 2
    return table


def shingle_hashes(token_hashes: Any, lengths: Any, n: Any) -> tuple[Any, Any]:
    """Hashes of the n-token windows of each document, from its tokens' hashes laid end to end.

    `token_hashes` holds every document's token hashes one after another, `lengths` how many each
    has, `n` the window (one for all documents, or one per document). A document shorter than its
    n tokens gives one shingle (all its tokens), an empty one none. Returns (shingles laid end to
    end, shingles per document)."""
    import numpy as np

    h = np.asarray(token_hashes, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, np.int64), lengths.shape)
    counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    total = h.size
    if total == 0:
        return np.zeros(0, np.uint64), counts
    ends = np.cumsum(lengths)
    widest, same_n = int(n.max()), bool((n == n.max()).all())
    n_of_token = None if same_n else np.repeat(n, lengths)
    # A window's hash, Horner's rule over its n tokens, for every position at once: each step adds
    # the tokens k places on. Windows that run past their document's end are dropped below, so
    # they may read the next document's tokens (or the zeros past the last).
    padded = np.concatenate([h, np.zeros(widest - 1, np.uint64)])
    prime = np.uint64(0x100000001B3)
    acc = h.copy()
    for k in range(1, widest):
        step = acc * prime + padded[k: k + total]
        acc = step if same_n else np.where(k < n_of_token, step, acc)
    # A document shorter than its n keeps one window, at its first token, of its tokens then zeros.
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if short.size:
        first, size, wide = ends[short] - lengths[short], lengths[short], n[short]
        window = h[first]
        for k in range(1, widest):
            token = np.where(k < size, h[np.minimum(first + k, total - 1)], np.uint64(0))
            window = np.where(k < wide, window * prime + token, window)
        acc[first] = window
    # The last min(n, length) - 1 positions of a document start no window of their own.
    keep = np.ones(total, bool)
    span = np.minimum(n, lengths)
    for j in range(1, widest):
        keep[ends[span > j] - j] = False
    salt = np.uint64(widest) if same_n else np.repeat(n.astype(np.uint64), counts)
    return fmix64(acc[keep] + salt), counts


CHUNK_CHARS = 1 << 18
"""Characters taken at a time where the code points of many texts go through numpy (shingles,
normalization): every pass over them allocates arrays of their size, and small ones are reused
chunk after chunk (warm in the cache, their pages already mapped) where a whole batch's would
each take fresh memory."""


def char_chunks(lengths: Any) -> list[tuple[int, int]]:
    """(first, end) of runs of consecutive texts (`lengths`: their lengths) of about CHUNK_CHARS
    characters each: a run ends with the text that reaches the next multiple of CHUNK_CHARS."""
    import numpy as np

    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(CHUNK_CHARS, int(ends[-1]) if ends.size else 0, CHUNK_CHARS)) + 1
    bounds = np.unique(np.concatenate(([0], cuts, [len(lengths)]))).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def shingle_texts(norms: list[str], word_ngram: int, char_ngram: int, cjk_share: float) -> tuple[Any, Any]:
    """Shingle hashes of normalized texts: (all shingles laid end to end, shingles per text).

    A text whose tokens are at least `cjk_share` CJK characters is shingled by characters: every
    word character is a token and a shingle is `char_ngram` of them. Any other text is shingled
    by words: a token is a run of word characters or one CJK character (what `TOKEN_RE` finds),
    and a shingle is `word_ngram` tokens. Punctuation and spacing never count. It runs on the
    code points of many texts at once (`char_chunks`), so no text becomes one Python string per
    token."""
    import numpy as np

    lengths = np.fromiter(map(len, norms), np.int64, len(norms))
    parts = [_shingle_chunk(norms[lo:hi], lengths[lo:hi], word_ngram, char_ngram, cjk_share)
             for lo, hi in char_chunks(lengths)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _shingle_chunk(norms: list[str], lengths: Any, word_ngram: int, char_ngram: int,
                   cjk_share: float) -> tuple[Any, Any]:
    """`shingle_texts` of a few texts (`lengths`: their lengths), all their code points at once."""
    import numpy as np

    cp = np.frombuffer("".join(norms).encode("utf-32-le", "surrogatepass"), np.uint32)
    cls = _char_classes()[cp]
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]

    def per_text(mask: Any) -> Any:
        """How many characters of each text `mask` marks."""
        counts = np.zeros(lengths.size, np.int64)
        if starts.size:
            counts[lengths > 0] = np.add.reduceat(mask, starts, dtype=np.int64)
        return counts

    word, cjk_char = cls == 1, cls == 2
    run_start = word.copy()  # first character of a run of (non-CJK) word characters
    run_start[1:] &= ~word[:-1]
    run_start[starts] = word[starts]
    n_cjk = per_text(cjk_char)
    n_tokens = n_cjk + per_text(run_start)
    cjk = (n_tokens > 0) & (n_cjk >= cjk_share * n_tokens)

    # Token starts: every word character in a CJK text; a word run's first character or a CJK
    # character otherwise. Each token's hash: sum of code point * 31^k over its characters k (k
    # capped at the last power in the table below), mixed.
    in_token = cls > 0
    token_start = np.where(np.repeat(cjk, lengths), in_token, run_start | cjk_char)
    chars = cp[in_token]
    tok_first = np.flatnonzero(token_start[in_token])  # each token's first character in `chars`
    within = np.arange(chars.size)
    within -= np.repeat(tok_first, np.diff(tok_first, append=chars.size))
    np.minimum(within, 63, out=within)
    weighted = (np.uint64(31) ** np.arange(64, dtype=np.uint64))[within]
    weighted *= chars
    token_hashes = fmix64(np.add.reduceat(weighted, tok_first)) if tok_first.size else np.zeros(0, np.uint64)
    return shingle_hashes(token_hashes, per_text(token_start), np.where(cjk, char_ngram, word_ngram))


class _UnionFind:
    """Groups of indices joined pair by pair; the smallest index of a group is its root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the better-ranked root (the survivor) stays root
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicates(norms: list[str], cfg: Any) -> tuple[list[tuple[int, int, float]], dict[str, Any]]:
    """Near duplicates among distinct normalized texts given in rank order (0 is the best):
    (duplicate, the survivor of its group, their shingle Jaccard similarity) for each, and stats.
    `cfg` is the `dedup` config (`stages.dedup.DedupConfig`).

    MinHash signatures and the LSH index are rensa's (R-MinHash over our shingle hashes, then
    `RMinHashLSH`, which flags every document that shares a band with another). The flagged
    documents' bands are then grouped here to list the candidate pairs, because rensa's index
    answers "has a candidate", not "which"; each pair is verified by exact Jaccard."""
    import numpy as np
    from rensa import RMinHash, RMinHashLSH

    n = len(norms)
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    perms = bands * rows  # rensa's index takes num_perm / bands rows per band: use exactly these
    lsh = RMinHashLSH(cfg.threshold, perms, bands)
    started = time.perf_counter()
    shingle_parts, count_parts, matrices = [], [], []
    for lo in range(0, n, cfg.batch_size):
        sh, counts = shingle_texts(norms[lo: lo + cfg.batch_size], cfg.word_ngram, cfg.char_ngram, cfg.cjk_share)
        shingle_parts.append(sh)
        count_parts.append(counts)
        has = counts[counts > 0]
        offsets = np.zeros(has.size + 1, np.uint64)
        np.cumsum(has, out=offsets[1:])
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(sh, offsets, perms, cfg.seed)
        lsh.insert_matrix(matrix, start_key=lo)  # keys are only counted, never read back
        matrices.append(matrix)
        done = min(lo + cfg.batch_size, n)
        if n > cfg.batch_size:
            rate = done / max(time.perf_counter() - started, 1e-9)
            log.info("dedup: sketched %d/%d documents (%.0f docs/s, ETA %.0fs)", done, n, rate, (n - done) / rate)
    one = len(shingle_parts) == 1  # no copy of the one batch's arrays
    counts, shingles = (count_parts[0], shingle_parts[0]) if one else (np.concatenate(count_parts),
                                                                      np.concatenate(shingle_parts))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    has = np.flatnonzero(counts > 0)  # a text without word characters cannot be a near duplicate
    flagged = has[np.concatenate([np.asarray(lsh.query_duplicate_flags_matrix(m), bool) for m in matrices])]

    # Signatures again for the flagged documents only (in batches: rensa hands rows back as Python
    # lists), to list their candidate pairs.
    pairs = np.zeros((0, 2), np.int64)
    if flagged.size > 1:
        sigs = np.empty((flagged.size, perms), np.uint32)
        for lo in range(0, flagged.size, cfg.batch_size):
            part = flagged[lo: lo + cfg.batch_size]
            sub_counts = counts[part]
            sub_offsets = np.zeros(part.size + 1, np.int64)
            np.cumsum(sub_counts, out=sub_offsets[1:])
            idx = np.repeat(offsets[part] - sub_offsets[:-1], sub_counts) + np.arange(sub_offsets[-1])
            matrix = RMinHash.digest_matrix_from_flat_token_hashes(shingles[idx], sub_offsets.astype(np.uint64),
                                                                   perms, cfg.seed)
            sigs[lo: lo + part.size] = np.array(matrix.to_rows(), dtype=np.uint32).reshape(part.size, perms)
        pairs = flagged[candidate_pairs(sigs, bands, rows, cfg.max_bucket)]

    @functools.cache
    def shingle_set(i: int) -> Any:
        return distinct(shingles[offsets[i]: offsets[i + 1]])

    dropped, checked, confirmed = verify(pairs, shingle_set, n, cfg.verify_threshold)
    stats = {"bands": bands, "rows": rows, "lsh_flagged": int(flagged.size), "candidate_pairs": int(len(pairs)),
             "checked_pairs": checked, "confirmed_pairs": confirmed}
    return dropped, stats


def verify(pairs: Any, shingle_set: Callable[[int], Any], n: int,
           threshold: float) -> tuple[list[tuple[int, int, float]], int, int]:
    """Near-duplicate groups from candidate `pairs` of rank positions (0 is the best; pairs sorted,
    i < j): a pair joins two groups when the exact Jaccard similarity of its shingle sets
    (`shingle_set(i)`: sorted unique hashes, asked again each time a pair needs it, so the caller
    decides what stays in memory) reaches `threshold`; a pair already inside one group is not
    checked. Returns (duplicate, the survivor of its group, their similarity) for every
    duplicate, and the counts of checked and confirmed pairs."""
    import numpy as np

    def jaccard(a: int, b: int) -> float:
        sa, sb = shingle_set(a), shingle_set(b)  # never empty: a text without shingles is in no pair
        at = np.minimum(sb.searchsorted(sa), sb.size - 1)  # where each of sa would sit in sb
        inter = int(np.count_nonzero(sb[at] == sa))
        return inter / (sa.size + sb.size - inter)

    uf = _UnionFind(n)
    checked = confirmed = 0
    for a, b in pairs.tolist():
        if uf.find(a) == uf.find(b):
            continue  # already one group: this pair's verdict could not change it
        checked += 1
        if jaccard(a, b) >= threshold:
            confirmed += 1
            uf.union(a, b)
    dropped = []
    for i in np.unique(pairs).tolist():
        root = uf.find(i)
        if root != i:
            dropped.append((i, root, round(jaccard(i, root), 4)))
    return dropped, checked, confirmed


def distinct(values: Any) -> Any:
    """The distinct values of a 1-d array, sorted: `np.unique` without its hash table, which on
    one document's shingles costs several times a sort."""
    import numpy as np

    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if ordered.size else ordered


def candidate_pairs(sigs: Any, bands: int, rows: int, max_bucket: int) -> Any:
    """Pairs (i < j) of rows of `sigs` that share all `rows` values of at least one band."""
    return pairs_from_keys(band_keys(sigs, bands, rows), max_bucket)


def band_keys(sigs: Any, bands: int, rows: int) -> Any:
    """One 64-bit key per band of each signature (rows x bands): equal keys, equal band."""
    import numpy as np

    n = sigs.shape[0]
    block = sigs[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    key = np.tile(np.arange(1, bands + 1, dtype=np.uint64), (n, 1))  # a band's number starts its key
    mult = np.uint64(0x9E3779B97F4A7C15)
    for t in range(rows):
        key = (key ^ block[:, :, t]) * mult
    return fmix64(key)


def pairs_from_keys(keys: Any, max_bucket: int) -> Any:
    """Pairs (i < j) of rows of `keys` (documents x bands) that share a band's key: the LSH
    buckets of every band (`pairs_in_band`), each pair once."""
    return unique_pairs([pairs_in_band(keys[:, b], max_bucket) for b in range(keys.shape[1])], keys.shape[0])


def pairs_in_band(key: Any, max_bucket: int) -> Any:
    """Pairs of positions in `key` (one band's key of each document) whose keys are equal: the
    band's LSH buckets. A bucket of at most `max_bucket` documents gives all its pairs; a bigger
    one (thousands of near-identical pages) gives each member with its neighbour and with the
    bucket's first member, which keeps the work linear and still joins a true group into one
    component."""
    import numpy as np

    order = np.argsort(key, kind="stable")
    ks = key[order]
    same = ks[1:] == ks[:-1]
    del ks
    if not same.any():
        return np.zeros((0, 2), np.int64)
    # Runs of equal keys: [run_start, run_end) in sorted order.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], same, [False])).astype(np.int8)))
    run_start, run_end = edges[0::2], edges[1::2] + 1
    sizes = run_end - run_start
    found: list[Any] = []
    for k in np.unique(sizes).tolist():
        at = run_start[sizes == k]
        if k <= max_bucket:
            members = np.sort(order[at[:, None] + np.arange(k)], axis=1)
            i, j = np.triu_indices(k, k=1)
            found.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
        else:
            for s in at.tolist():
                members = np.sort(order[s: s + k])
                found.append(np.stack([members[:-1], members[1:]], axis=1))
                found.append(np.stack([np.full(k - 2, members[0]), members[2:]], axis=1))
    return np.concatenate(found).astype(np.int64)


def unique_pairs(found: list[Any], n: int) -> Any:
    """The pairs of `found` (arrays of pairs of positions below n) as (i < j), each once, sorted."""
    import numpy as np

    found = [f for f in found if len(f)]
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    pairs.sort(axis=1)
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1)


def signatures(norms: list[str], cfg: Any) -> tuple[Any, Any, Any]:
    """Shingles and MinHash band keys of normalized texts, for the sharded dedup: (shingles laid
    end to end, shingles per text, band keys of the texts that have shingles). The signatures are
    the ones `near_duplicates` computes (rensa's R-MinHash over the same shingles and seed)."""
    import numpy as np
    from rensa import RMinHash

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    perms = bands * rows
    sh, counts = shingle_texts(norms, cfg.word_ngram, cfg.char_ngram, cfg.cjk_share)
    has = counts[counts > 0]
    keys = np.zeros((has.size, bands), np.uint64)
    start = 0
    for lo in range(0, has.size, cfg.batch_size):  # rensa hands rows back as Python lists
        part = has[lo: lo + cfg.batch_size]
        offsets = np.zeros(part.size + 1, np.uint64)
        np.cumsum(part, out=offsets[1:])
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(sh[start: start + int(offsets[-1])], offsets,
                                                               perms, cfg.seed)
        flat = np.fromiter(chain.from_iterable(matrix.to_rows()), np.uint32, part.size * perms)
        sigs = flat.reshape(part.size, perms)
        keys[lo: lo + part.size] = band_keys(sigs, bands, rows)
        start += int(offsets[-1])
    return sh, counts, keys
