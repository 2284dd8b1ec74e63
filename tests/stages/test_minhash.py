"""stages.common.minhash: LSH layout, shingles and candidate pairs on inline data."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common import minhash
from stages.common.minhash import candidate_pairs, lsh_bands, shingle_hashes, shingle_texts


def test_lsh_bands_fit_the_threshold() -> None:
    assert lsh_bands(0.5, 128) == (25, 5)
    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128 and rows > 5  # a higher threshold needs more rows per band


def test_shingle_hashes_windows_and_short_documents() -> None:
    hashes, counts = shingle_hashes(np.array([1, 2, 3, 4, 5, 6], np.uint64), np.array([4, 1, 0, 1]), 3)
    assert counts.tolist() == [2, 1, 0, 1]  # 4 tokens: 2 windows; 1 token: one shingle; none: none
    assert len(hashes) == 4 and len(set(hashes.tolist())) == 4


def test_shingles_ignore_punctuation_and_count_cjk_by_characters() -> None:
    texts = ["the cat sat on the mat", "the cat, sat on the mat!", "中文文本", ""]
    hashes, counts = shingle_texts(texts, 3, 2, 0.3)
    assert counts.tolist() == [4, 4, 3, 0]
    first, second = hashes[:4], hashes[4:8]
    assert first.tolist() == second.tolist()


def test_shingles_do_not_depend_on_how_the_texts_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts are shingled a chunk of characters at a time; a chunk boundary anywhere (inside a
    word run, between empty texts, past a CJK text shorter than its shingle) changes nothing."""
    texts = ["", "the cat sat on the mat", "", "中文", "a 中 b 文 c", "x" * 70 + " y z", "😀 𠀀𠀁 w", "",
             "the cat, sat on the mat!"] * 3
    for n in ((3, 2), (2, 2), (1, 4)):
        whole = shingle_texts(texts, *n, 0.3)
        for chunk in (1, 5, 40):
            monkeypatch.setattr(minhash, "CHUNK_CHARS", chunk)
            hashes, counts = shingle_texts(texts, *n, 0.3)
            assert counts.tolist() == whole[1].tolist() and hashes.tolist() == whole[0].tolist()
        monkeypatch.undo()
    assert shingle_texts(texts, 3, 2, 0.3)[1].tolist()[:5] == [0, 4, 0, 1, 4]


def test_candidate_pairs_share_a_band() -> None:
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 6, 7, 8]], np.uint32)
    assert candidate_pairs(sigs, bands=2, rows=2, max_bucket=64).tolist() == [[0, 1], [0, 2]]
