"""stages.common.text: Unicode repair, surrogates, and the one CJK definition clean and dedup share."""

from __future__ import annotations

import numpy as np

from stages.common.minhash import TOKEN_RE, _char_classes
from stages.common.quality import Doc
from stages.common.text import CJK_CHAR, CJK_RANGES, fix_surrogates, repair, tidy


def test_repair_removes_controls_and_keeps_tabs_and_newlines() -> None:
    assert repair("a\x00b\x07c\td\r\ne\x1bf\x7f", "NFC", True) == "abc\td\nef"


def test_repair_replaces_lone_surrogates_and_joins_pairs() -> None:
    assert repair("bad \ud800 half", "NFC", True) == "bad \ufffd half"
    assert repair("pair \ud83d\ude00", "NFC", True) == "pair \U0001F600"
    assert fix_surrogates("pair \ud83d\ude00 and \udc00") == "pair \U0001F600 and \ufffd"
    text = "no surrogate here"
    assert fix_surrogates(text) is text


def test_repair_fixes_mojibake_but_keeps_chinese_punctuation() -> None:
    assert repair("cafÃ© au lait", "NFC", True) == "café au lait"
    assert repair("cafÃ© au lait", "NFC", False) == "cafÃ© au lait"
    assert repair("１９９８年，“一国两制”。", "NFC", True) == "１９９８年，“一国两制”。"


def test_repair_normal_forms() -> None:
    assert repair("e\u0301", "NFC", True) == "\u00e9"  # NFC composes
    assert repair("①２", "NFKC", True) == "12"
    assert repair("①２", "NFC", True) == "①２"
    assert repair("e\u0301", None, True) == "e\u0301"


def test_tidy() -> None:
    assert tidy("\n\na  \nb\n\n\n\nc\t\n") == "a\nb\n\nc"


def test_one_cjk_definition_for_clean_and_dedup() -> None:
    """Han, kana, Hangul and the Han extensions are one token per character for the quality
    rules (clean) and the shingles (dedup) alike; Latin, digits and emoji are not CJK."""
    samples = {"中": True, "カ": True, "한": True, "\U00020000": True, "a": False, "7": False, "😀": False}
    for char, cjk in samples.items():
        assert bool(CJK_CHAR.match(char)) is cjk, char
    assert Doc("한국어 문장", "ko", 1.0).tokens == ["한", "국", "어", "문", "장"]
    assert TOKEN_RE.findall("한국어 text") == ["한", "국", "어", "text"]
    table = _char_classes()
    cjk = [cp for lo, hi in CJK_RANGES for cp in range(lo, hi + 1)]
    assert (table[cjk] == 2).all() and int((table == 2).sum()) == len(cjk)
    assert table[ord("a")] == 1 and table[ord(",")] == 0 and table[ord("😀")] == 0
    assert np.uint8(table[ord("7")]) == 1


def test_ftfy_is_skipped_only_where_it_would_change_nothing() -> None:
    import ftfy

    from stages.common.text import _ftfy_may_change

    def fixed(text: str) -> str:
        return ftfy.fix_text(text, fix_character_width=False, uncurl_quotes=False, normalization=None, explain=False)

    clean = ["plain ASCII prose.", "１９９８年，“一国两制”。", "naïve café — “quoted”", "Ünïcödé ÷ ±"]
    damaged = ["cafÃ© au lait", "âœ” No problems", "it&#x2019;s ﬂubberiﬁc", "voilÃ le travail", "x\nÃ  y",
               "a\x85b", "\x1b[31mred", "\ufeffbom", "line\u2028break", "ГўВЂВ™s", "Ã ",
               "中文".encode().decode("latin-1"), "café".encode().decode("cp1252")]
    for text in clean + damaged:
        assert _ftfy_may_change(text) or fixed(text) == text, text
    for text in damaged:
        assert _ftfy_may_change(text), text  # each of these is something ftfy rewrites
    assert not _ftfy_may_change(clean[0]) and not _ftfy_may_change(clean[1])  # the common case goes without ftfy
