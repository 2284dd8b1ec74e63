"""Issue 9 (nothing lost), quality rules: good prose is kept, junk lines go, junk documents drop.

Real text only, from packages the demo does not read as corpus (bench/clean_bench.py builds the
held-out sets): a long one-line English article without its final full stop is kept whole;
Chinese news paragraphs without a final stop are kept; a document with a few junk lines loses
those lines and keeps the rest; a document that is mostly junk lines drops with its reason; and
>= 98% of held-out natural English and Chinese prose is kept.
"""

from __future__ import annotations

import pytest

from bench.clean_bench import BOILERPLATE, MENU, natural_docs
from stages import clean
from stages.clean import Cleaner
from stages.common.io import Drop
from stages.common.quality import _PUNCT_END
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def cleaner() -> Cleaner:
    return Cleaner(tiny_config("clean"), clean.LanguageId())


@pytest.fixture(scope="module")
def held_out() -> dict[str, list[str]]:
    return natural_docs(100)


def keep(cleaner: Cleaner, text: str) -> dict | Drop:
    return cleaner.corpus({"id": "x", "source": "news", "text": text})


def test_long_one_line_article_without_final_stop_is_kept_whole(cleaner: Cleaner,
                                                                 held_out: dict[str, list[str]]) -> None:
    articles = [t for t in held_out["en_one_line"] if len(t) >= 2000][:5]
    assert articles and all("\n" not in t and not t.endswith(".") for t in articles)
    for text in articles:
        out = keep(cleaner, text)
        assert isinstance(out, dict), out
        # whole: only encoding repair (the BBC text has some mojibake) and PII placeholders touch it
        assert out["text"] == cleaner.text(text)[0] and out["lang"] == "en"


def test_chinese_news_paragraphs_are_kept(cleaner: Cleaner, held_out: dict[str, list[str]]) -> None:
    # People's Daily paragraphs that end without a full stop (a summary cut at its end, an
    # editor's note signed "———编者") and paragraphs that end with one.
    from bench.clean_bench import _peoples_daily_paragraphs

    open_ended = [p for p in _peoples_daily_paragraphs() if len(p) >= 100 and not _PUNCT_END.search(p)
                  and "，" in p and "。" in p][:10]
    assert len(open_ended) == 10
    for text in open_ended + held_out["zh_paragraph"][:20]:
        out = keep(cleaner, text)
        assert isinstance(out, dict), (text, out)
        assert out["text"] == text and out["lang"] == "zh"


def test_a_few_junk_lines_go_and_the_rest_stays(cleaner: Cleaner, held_out: dict[str, list[str]]) -> None:
    before = sum(cleaner.lines_removed.values())
    for prose in (held_out["en"][0], held_out["zh"][1]):
        junk_head, junk_tail = MENU[:4], [BOILERPLATE[0], BOILERPLATE[3], "Share | Tweet | Email", "-----"]
        out = keep(cleaner, "\n".join([*junk_head, prose, *junk_tail]))
        assert isinstance(out, dict), out
        for line in junk_head + junk_tail:
            assert line not in out["text"].splitlines()
        kept = out["text"].splitlines()
        # every prose line that ends a sentence is still there, in order
        sentences = [ln for ln in prose.splitlines() if _PUNCT_END.search(ln.strip())]
        assert [ln for ln in kept if ln in sentences] == sentences
    assert sum(cleaner.lines_removed.values()) - before >= 16


def test_mostly_junk_lines_drop_with_the_reason(cleaner: Cleaner, held_out: dict[str, list[str]]) -> None:
    sentence = held_out["en"][3].split(". ")[0] + "."
    headlines = [" ".join(t.split()[:6]) for t in held_out["en"][10:30]]  # a list of links to stories
    out = keep(cleaner, "\n".join(MENU + headlines + [sentence]))
    assert isinstance(out, Drop) and out.reason == "no_terminal_punct_lines"
    assert "40 no_terminal_punct" in out.detail
    cookies = "\n".join(BOILERPLATE + [sentence])
    out = keep(cleaner, cookies)
    assert isinstance(out, Drop) and out.reason == "cookie_policy_lines"


def test_held_out_natural_prose_is_kept(cleaner: Cleaner, held_out: dict[str, list[str]]) -> None:
    # Per language, 100 documents: English articles as they ship (a line per paragraph) and as one
    # line without the final stop; Chinese four-paragraph news documents and single paragraphs.
    mixes = {"en": held_out["en"][:50] + held_out["en_one_line"][50:],
             "zh": held_out["zh"][:50] + held_out["zh_paragraph"][50:]}
    for lang, texts in mixes.items():
        assert len(texts) == 100
        dropped = [(out.reason, t[:80]) for t in texts if isinstance(out := keep(cleaner, t), Drop)]
        assert len(texts) - len(dropped) >= 0.98 * len(texts), (lang, dropped)
