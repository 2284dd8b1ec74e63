"""clean: every rule on inline examples, PII redaction, markup removal, and the stage end to end
on a small raw folder (nothing lost: every record is kept or quarantined with its reason)."""

from __future__ import annotations

import json
import random
from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages import clean
from stages.clean import Cleaner
from stages.common import markup, pii, quality
from stages.common.config import Paths
from stages.common.io import Drop, read_records, write_records
from stages.common.quality import Doc
from stages.common.shards import shard_paths
from stages.common.text import tidy
from tests.conftest import tiny_config, tiny_params

CFG = tiny_config("clean")

ENGLISH = (
    "The town council met on Monday evening to discuss the new library. Members agreed that the old "
    "building was too small for the growing number of visitors, and that a larger site near the river "
    "would be better for families with young children. The mayor said the plan would be paid for with "
    "a mix of local taxes and a grant from the regional government. Work is expected to begin in the "
    "spring and to take about two years. Residents will be able to comment on the design at a public "
    "meeting next month."
)
CHINESE = (
    "今年春天，这个小镇的图书馆开始了扩建工程。镇长表示，新馆将有更多的阅览座位和儿童阅读区，"
    "并且会为老年读者提供大字书籍。工程预计在明年秋天完成，届时居民可以在这里参加讲座和展览。"
    "许多家长对这个消息感到高兴，他们希望孩子们能有一个安静的地方学习。"
)
FRENCH = (
    "Le conseil municipal s'est réuni lundi soir pour discuter de la nouvelle bibliothèque. Les membres "
    "ont convenu que l'ancien bâtiment était trop petit pour le nombre croissant de visiteurs, et qu'un "
    "site plus grand près de la rivière serait meilleur pour les familles avec de jeunes enfants. Le maire "
    "a déclaré que le projet serait financé par les impôts locaux et une subvention de la région."
)
WIKI = (
    "Lighthouse\n\n{{Infobox building|name=Lighthouse|height=30 m}}\n"
    "A '''lighthouse''' is a [[tower]] that emits light to guide [[Ship|ships]] at sea."
    "<ref>{{cite book|title=Lights}}</ref> "
    "Lighthouses mark dangerous coastlines, hazardous shoals and reefs, and safe entries to harbors.<ref name=\"a\"/> "
    "<!-- editors: keep this short -->\n"
    "[[File:Lighthouse.jpg|thumb|A lighthouse at dusk]]\n\n"
    "== History ==\n"
    "Before the [[Industrial Revolution]], lighthouses were fires lit on hilltops. Later, towers were built "
    "so that the light could be seen from further away by the crews of passing ships, and lenses made the "
    "beam brighter and easier to tell apart from other lights on the shore. Today most of them are automated "
    "and are looked after by a small number of engineers who visit them a few times each year.\n\n"
    "{| class=\"wikitable\"\n! Year !! Count\n|-\n| 1900 || 12\n|}\n\n"
    "== References ==\n{{reflist}}\n* Smith, J. ''Lights of the coast''.\n\n"
    "[[Category:Towers]]\n[[de:Leuchtturm]]\n"
)


@pytest.fixture(scope="module")
def langid() -> clean.LanguageId:
    return clean.LanguageId()


def doc(text: str, lang: str = "en") -> Doc:
    return Doc(text, lang, 1.0)


def reason(result: Drop | None) -> str | None:
    return result.reason if result else None


# --- markup -----------------------------------------------------------------------------------


def test_wikitext_stripped() -> None:
    out = tidy(markup.strip_wikitext(WIKI, CFG.wiki_drop_sections))
    assert out.startswith("Lighthouse\n\nA lighthouse is a tower that emits light to guide ships at sea.")
    for junk in ("{{", "}}", "[[", "]]", "<ref", "cite book", "Infobox", "thumb", "editors", "wikitable",
                 "1900", "Category", "Towers", "Leuchtturm", "References", "Smith", "'''"):
        assert junk not in out, junk
    assert "History\nBefore the Industrial Revolution, lighthouses were fires" in out


def test_wiki_link_label_and_target() -> None:
    assert markup.strip_wikitext("see [[Paris|the capital]] and [[Lyon]].") == "see the capital and Lyon."


def test_html_to_text_drops_scripts_and_navigation() -> None:
    page = ("<html><head><title>T</title><script>var x = 1;</script></head><body><nav>Home | About</nav>"
            "<article><h1>Big news</h1><p>The council approved the new budget on Monday after a long debate "
            "about schools, roads and the library.</p><p>Residents will see lower fees next year.</p></article>"
            "<footer>Copyright</footer></body></html>")
    out = markup.html_to_text(page)
    assert "The council approved the new budget" in out and "Residents will see lower fees" in out
    assert "var x" not in out and "<p>" not in out
    fragment = "<p>Hello <b>world</b> &amp; friends</p><script>bad()</script>"
    assert markup.html_to_text(fragment) == "Hello world & friends"


def test_markup_detection() -> None:
    assert markup.detect_markup(WIKI) == "mediawiki"
    assert markup.detect_markup("<html><body><div><p>a</p><p>b</p></div></body></html>") == "html"
    assert markup.detect_markup(ENGLISH) == "text"
    assert markup.detect_markup(CHINESE) == "text"


# --- PII --------------------------------------------------------------------------------------

PII = {
    "email": "write to jane.doe@example.co.uk today",
    "phone": "call +44 20 7946 0958 or (555) 123-4567",
    "ipv4": "the server at 192.168.10.254 answered",
    "ipv6": "host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 is up",
    "aws_key": "key AKIAIOSFODNN7EXAMPLE leaked",
    "github_token": "token ghp_" + "a1B2c3D4e5" * 4 + " here",
    "slack_token": "use xoxb-123456789012-abcdefABCDEF now",
    "api_key": "OPENAI sk-" + "Ab3dEf6hIj" * 3 + " set",
    "bearer_token": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc123def456",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----",
}


@pytest.mark.parametrize("kind", sorted(PII))
def test_pii_redacted(kind: str) -> None:
    text, counts = Cleaner(CFG).text(PII[kind])
    assert f"<{kind.upper()}>" in text
    assert counts[kind] >= 1
    assert set(counts) == {kind}


def test_no_pii_false_positive_on_numbers_and_dates() -> None:
    text = ("On 12 March 2003 the firm earned 1,234,567 dollars (up 4.5%). Version 3.2.1 shipped in "
            "1998 2001 2003; call ext. 42, room 101. 中国运动员共获得１１２３个世界冠军。")
    assert Cleaner(CFG).text(text) == (text, {})


# Matches of every pattern in other spellings: case, separators, several in one text.
PII_MORE = [
    "BEARER abcdefghijklmnopqrstuvwxyz0123 and bEaReR " + "x1" * 12,
    "mail a.b@c.de, x_y+z@mail.example.org",
    "call 020 7946 0958, 555.123.4567, 555-123-4567, +1 (555) 123 4567 or (020) 555-0199",
    "ip 10.0.0.1 and fe80:0:0:0:0:0:0:1 and DEAD:BEEF:0:0:0:0:0:1",
    "github_pat_" + "A1_b" * 16 + " ghs_" + "x" * 36,
    "rk-" + "x" * 24 + " pk-" + "y_" * 12 + " xoxp-1234567890-abc ASIA" + "Q" * 16,
    "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----",
]


def test_pii_gates_pass_every_match() -> None:
    """`redact` skips a pattern where its gate finds nothing, so each gate must pass every match of
    its pattern, and redaction must equal running all ten patterns."""
    texts = [*PII.values(), *PII_MORE, "On 12 March 2003: 1,234,567 dollars (up 4.5%), version 3.2.1."]
    matched = set()
    for text in texts:
        expected, counts = text, {}
        for name, pattern in pii.PATTERNS.items():
            for found in pattern.finditer(expected):
                matched.add(name)
                assert pii.GATES[name](found.group()), f"{name} gate misses {found.group()!r}"
            expected, n = pattern.subn(pii.PLACEHOLDERS[name], expected)
            counts.update({name: n} if n else {})
        assert pii.redact(text) == (expected, counts)
    assert matched == set(pii.PATTERNS)


# --- corpus rules -----------------------------------------------------------------------------


def test_word_count_counts_cjk_characters() -> None:
    assert quality.word_count(doc(ENGLISH), 50, 100_000) is None
    assert reason(quality.word_count(doc("Too short to be a document."), 50, 100_000)) == "too_few_words"
    assert reason(quality.word_count(doc(ENGLISH), 10, 20)) == "too_many_words"
    zh = doc(CHINESE, "zh")
    assert zh.cjk and len(zh.words) > 100  # no spaces, yet over a hundred words
    assert quality.word_count(zh, 50, 100_000) is None
    assert reason(quality.word_count(doc("图书馆扩建。", "zh"), 50, 100_000)) == "too_few_words"


def test_mean_word_length() -> None:
    assert quality.mean_word_length(doc(ENGLISH), 3, 10) is None
    assert reason(quality.mean_word_length(doc("a b c d e f g h " * 10), 3, 10)) == "mean_word_length"
    assert reason(quality.mean_word_length(doc("x" * 30 + " " + "y" * 30), 3, 10)) == "mean_word_length"
    assert quality.mean_word_length(doc(CHINESE, "zh"), 3, 10) is None  # not measured in CJK


def test_symbol_ratio() -> None:
    assert quality.symbol_ratio(doc(ENGLISH), 0.1) is None
    dropped = quality.symbol_ratio(doc("#tag #more #hash words here... and more…"), 0.1)
    assert dropped.reason == "symbol_ratio" and dropped.detail.startswith("symbol ratio") and "> 0.10" in dropped.detail


def test_alpha_words_and_digits() -> None:
    assert quality.alpha_words(doc(ENGLISH), 0.8) is None
    assert quality.alpha_words(doc(CHINESE, "zh"), 0.8) is None
    assert reason(quality.alpha_words(doc("12 34 56 78 -- ++ apples"), 0.8)) == "few_alpha_words"
    assert quality.digit_fraction(doc(ENGLISH), 0.25) is None
    assert reason(quality.digit_fraction(doc("Scores: 1234 5678 9012 3456 7890 and then 1111"), 0.25)) == "digit_ratio"


def test_line_rules() -> None:
    bullets = "\n".join(f"• item number {i}" for i in range(10))
    assert reason(quality.bullet_lines(doc(bullets), 0.9)) == "bullet_lines"
    assert quality.bullet_lines(doc(ENGLISH), 0.9) is None
    teasers = "\n".join(f"Read the story about topic {i}..." for i in range(5))
    assert reason(quality.ellipsis_lines(doc(teasers), 0.3)) == "ellipsis_lines"
    assert quality.ellipsis_lines(doc("他走了……\n大家都哭了……\n第二天又来了。", "zh"), 0.3) is None


def test_line_rules_remove_lines() -> None:
    unpunctuated = partial(quality.unpunctuated_line, prose_min_words=25)
    for line in ("Home", "About us", "Share | Tweet | Email", "标题"):
        assert unpunctuated(line) == "no_terminal_punct"
    # Chinese: full stop, and a photo credit after the full stop, both end a sentence.
    for line in (ENGLISH, CHINESE, "新年讲话发表了。（新华社记者摄）", 'He said: "We won."'):
        assert unpunctuated(line) is None
    assert unpunctuated(ENGLISH.rstrip(".")) is None  # prose whose last stop is missing
    assert unpunctuated(" ".join(["word"] * 40)) == "no_terminal_punct"  # long, but no sentence in it
    assert quality.letterless_line("---- 12 | 34 ----") == "no_letters"
    assert quality.letterless_line("第二") is None
    phrases = {"cookie_policy": ["cookies"], "javascript": ["javascript"]}
    assert quality.phrase_line("Please enable JavaScript.", phrases) == "javascript"
    rules = quality.line_rules(CFG)
    cut = quality.remove_lines("Home\nNews\n\n" + ENGLISH + "\n\nThis site uses cookies.\n###", rules)
    assert cut.text == ENGLISH
    assert cut.lines == {"no_terminal_punct": 2, "cookie_policy": 1, "no_letters": 1}
    assert quality.too_little_left(cut, 0.5, 50) is None
    menu = "\n".join(["Home", "About us", "Contact", "Shop", "Login"] + ["A short line here."])
    cut = quality.remove_lines(menu, rules)
    assert reason(quality.too_little_left(cut, 0.5, None)) == "no_terminal_punct_lines"
    # below min_words after removal, though most of the words stay
    short = "Navigation menu entry\n" + " ".join(["Words that stay."] * 16)  # 51 words, 48 left
    dropped = quality.too_little_left(quality.remove_lines(short, rules), 0.5, 50)
    assert reason(dropped) == "no_terminal_punct_lines"
    assert dropped.detail.startswith("line rules left 48 of 51 words")  # the text's words: those left + removed
    assert quality.drop_phrases(doc("Lorem ipsum dolor sit amet."), ["lorem ipsum"]).reason == "drop_phrase"


def test_stop_words_by_language() -> None:
    words = CFG.stop_words
    assert quality.stop_words(doc(ENGLISH), words, 2) is None
    spam = doc("Buy cheap watches online now best prices guaranteed")
    assert reason(quality.stop_words(spam, words, 2)) == "no_stop_words"
    assert quality.stop_words(doc(CHINESE, "zh"), words, 2) is None
    assert quality.stop_words(doc("Bonjour", "fr"), words, 2) is None  # no list for French: no rule


def test_repetition_rules() -> None:
    lines = "\n".join(["Click here to subscribe."] * 5 + ["A real sentence about something."] * 2)
    assert reason(quality.dup_lines(doc(lines), 0.3, 0.2)) == "dup_lines"
    assert quality.dup_lines(doc(ENGLISH), 0.3, 0.2) is None
    long_dup = "\n".join(["This one long line is repeated to fill the page with the same words."] * 2
                         + [f"Short line {i}." for i in range(8)])
    assert reason(quality.dup_lines(doc(long_dup), 0.3, 0.2)) == "dup_line_chars"
    paras = "\n\n".join(["Same paragraph again and again."] * 4 + [ENGLISH])
    assert reason(quality.dup_paragraphs(doc(paras), 0.3, 0.2)) == "dup_paragraphs"
    spam = "buy now " * 40 + ENGLISH
    assert reason(quality.top_ngrams(doc(spam), {2: 0.2})) == "top_ngram"
    assert quality.top_ngrams(doc(ENGLISH), {2: 0.2, 3: 0.18, 4: 0.16}) is None
    repeated = (ENGLISH + " ") * 2
    assert reason(quality.dup_ngrams(doc(repeated), {5: 0.15})) == "dup_ngrams"
    assert quality.dup_ngrams(doc(ENGLISH), {5: 0.15, 10: 0.1}) is None
    zh = doc(CHINESE, "zh")
    cfg = CFG
    assert quality.top_ngrams(zh, cfg.max_top_ngram_fraction, cfg.cjk_ngram_scale) is None
    assert quality.dup_ngrams(zh, cfg.max_dup_ngram_fraction, cfg.cjk_ngram_scale) is None
    twice = doc(CHINESE * 2, "zh")
    assert reason(quality.dup_ngrams(twice, cfg.max_dup_ngram_fraction, cfg.cjk_ngram_scale)) == "dup_ngrams"


def test_language_rule() -> None:
    assert quality.language(Doc("x", "en", 0.99), ["en", "zh"], 0.5) is None
    assert reason(quality.language(Doc("x", "fr", 0.99), ["en", "zh"], 0.5)) == "wrong_language"
    assert reason(quality.language(Doc("x", "en", 0.3), ["en", "zh"], 0.5)) == "uncertain_language"
    assert quality.language(Doc("x", "fr", 0.99), [], 0.5) is None


def test_disabled_rule_is_left_out() -> None:
    names = {r.func.__name__ for r in quality.corpus_rules(tiny_config("clean", max_digit_fraction=None))}
    assert "digit_fraction" not in names and "word_count" in names


def test_good_documents_pass_every_rule(langid: clean.LanguageId) -> None:
    cleaner = Cleaner(CFG, langid)
    for text, lang in ((ENGLISH, "en"), (CHINESE, "zh")):
        out = cleaner.corpus({"id": "x", "source": "news", "text": text})
        assert out == {"id": "x", "source": "news", "text": text, "lang": lang}


# --- the stage --------------------------------------------------------------------------------


def raw_records() -> dict[str, list[dict]]:
    corpus = [
        {"id": "en", "source": "abc_news", "text": ENGLISH + " Contact jane.doe@example.com for details."},
        {"id": "zh", "source": "peoples_daily", "text": CHINESE},
        {"id": "wiki", "source": "wikipedia", "text": WIKI},
        {"id": "dirty", "source": "abc_news", "text": ENGLISH.replace("library", "lib\x00rary\x07")},
        {"id": "huge", "source": "abc_news", "text": "word " * 1_000_000},  # 5 MB
        {"id": "short", "source": "abc_news", "text": "Just a headline."},
        {"id": "fr", "source": "abc_news", "text": FRENCH},
        {"id": "templates", "source": "wikipedia", "text": "{{Infobox}}\n[[Category:Empty]]"},
    ]
    good = [{"role": "user", "content": "Summarise: the council met."}, {"role": "assistant", "content": "It met."}]
    instructions = [
        {"id": "ok", "source": "xsum", "messages": good},
        {"id": "no_answer", "source": "xsum", "messages": [{"role": "user", "content": "Hello?"}]},
        {"id": "empty", "source": "xsum", "messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": " \x00 "}]},
        {"id": "key", "source": "hhh", "messages": [{"role": "user", "content": "my key is AKIAIOSFODNN7EXAMPLE"},
                                                    {"role": "assistant", "content": "Please rotate it."}]},
    ]
    preferences = [
        {"id": "ok", "source": "hhh", "prompt": "Q?", "chosen": "A good answer.", "rejected": "A bad one."},
        {"id": "same", "source": "hhh", "prompt": "Q?", "chosen": "Same answer.", "rejected": "Same answer. "},
        {"id": "blank", "source": "hhh", "prompt": "Q?", "chosen": "", "rejected": "Something."},
    ]
    return {"corpus": corpus, "instructions": instructions, "preferences": preferences}


EXPECTED_DROPS = {
    "corpus": {"huge": "too_long", "short": "too_few_words", "fr": "wrong_language", "templates": "empty"},
    "instructions": {"no_answer": "no_answer", "empty": "empty_answer"},
    "preferences": {"same": "identical_pair", "blank": "empty_answer"},
}


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory, langid: clean.LanguageId) -> tuple[Paths, dict]:
    root = tmp_path_factory.mktemp("clean")
    paths = Paths(**{name: root / name for name in Paths.model_fields})
    for kind, records in raw_records().items():
        write_records(paths.raw, kind, records)
    mp = pytest.MonkeyPatch()
    mp.setattr(clean, "LanguageId", lambda: langid)  # load the model once for the module
    try:
        metrics = clean.run(CFG, paths, data=tiny_config("data"))
    finally:
        mp.undo()
    return paths, metrics


def test_stage_keeps_good_and_quarantines_the_rest(stage_run: tuple[Paths, dict]) -> None:
    paths, metrics = stage_run
    raw = raw_records()
    for kind, records in raw.items():
        kept = {r["id"] for r in read_records(paths.clean, kind)}
        quarantined = read_records(paths.quarantine, kind)
        reasons = {q["id"]: q["reason"] for q in quarantined}
        assert reasons == EXPECTED_DROPS[kind]
        assert kept | set(reasons) == {r["id"] for r in records} and not kept & set(reasons)
        for q in quarantined:  # the original record, and a readable detail
            assert json.loads(q["record"])["id"] == q["id"] and q["detail"] and q["source"]
        tally = metrics["kinds"][kind]
        assert tally["docs_in"] == len(records) == tally["docs_out"] + sum(tally["dropped"].values())
    assert metrics["docs_in"] == metrics["docs_out"] + sum(metrics["dropped"].values()) == sum(map(len, raw.values()))
    assert metrics["dropped"]["too_long"] == 1


def test_stage_output_is_clean(stage_run: tuple[Paths, dict]) -> None:
    paths, metrics = stage_run
    corpus = {r["id"]: r for r in read_records(paths.clean, "corpus")}
    assert pq.read_schema(shard_paths(paths.clean, "corpus")[0]).names == ["id", "source", "text", "lang"]
    assert corpus["en"]["text"].endswith("Contact <EMAIL> for details.") and corpus["en"]["lang"] == "en"
    assert corpus["zh"]["lang"] == "zh"
    assert "\x00" not in corpus["dirty"]["text"] and "library" in corpus["dirty"]["text"]
    assert "{{" not in corpus["wiki"]["text"] and "ships at sea" in corpus["wiki"]["text"]
    instructions = {r["id"]: r for r in read_records(paths.clean, "instructions")}
    assert instructions["key"]["messages"][0]["content"] == "my key is <AWS_KEY>"
    assert metrics["redacted"] == {"aws_key": 1, "email": 1}
    assert metrics["languages"] == {"en": 3, "zh": 1}
    # the wiki page's title and section heading are lines without a sentence: removed and counted
    assert "History" not in corpus["wiki"]["text"].splitlines() and metrics["lines_removed"] == {"no_terminal_punct": 2}


def test_stage_reports_samples(stage_run: tuple[Paths, dict]) -> None:
    paths, _ = stage_run
    report = paths.report_dir("clean")
    kept = [json.loads(line) for line in (report / "samples_kept.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (report / "samples_dropped.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in kept} == {"corpus", "instructions", "preferences"}
    assert all(len(s["text"]) <= 501 for s in kept + dropped)
    assert {s["reason"] for s in dropped} == {r for d in EXPECTED_DROPS.values() for r in d.values()}
    lines = [json.loads(line) for line in (report / "samples_lines_removed.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"], s["line"]) for s in lines] == [("wiki", "no_terminal_punct", "Lighthouse")]


def test_empty_input_writes_every_kind(paths: Paths, langid: clean.LanguageId, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clean, "LanguageId", lambda: langid)
    for kind in ("corpus", "instructions", "preferences"):
        write_records(paths.raw, kind, [])  # what collect writes for a kind with no record: one empty shard
    metrics = clean.run(CFG, paths, data=tiny_config("data"))
    assert metrics["docs_in"] == metrics["docs_out"] == 0
    for kind in ("corpus", "instructions", "preferences"):
        assert shard_paths(paths.clean, kind) and shard_paths(paths.quarantine, kind)
    assert "lang" in pq.read_schema(shard_paths(paths.clean, "corpus")[0]).names


def test_main_reads_its_params_section(tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch,
                                       langid: clean.LanguageId) -> None:
    monkeypatch.setattr(clean, "LanguageId", lambda: langid)
    write_records(paths.raw, "corpus", [{"id": "en", "source": "abc_news", "text": ENGLISH}])
    params = tmp_path / "params.yaml"
    section = tiny_params()["clean"]
    params.write_text(yaml.safe_dump({"paths": paths.model_dump(mode="json"), "clean": {**section, "min_words": 10},
                                      "data": tiny_params()["data"]}))
    assert clean.main(["--params", str(params), "--no-mlflow"]) == 0
    metrics = json.loads((paths.report_dir("clean") / "metrics.json").read_text())
    assert metrics["docs_out"] == 1
    params.write_text(yaml.safe_dump({"paths": paths.model_dump(mode="json"), "clean": {**section, "min_wrds": 10}}))
    assert clean.main(["--params", str(params), "--no-mlflow"]) == 2


def test_batch_language_id_is_py3langid(langid: clean.LanguageId) -> None:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    texts = [ENGLISH, CHINESE, FRENCH, WIKI, "", " ", "OK", "ALL CAPS TEXT HERE", ENGLISH * 60, "漢" * 30_000,
             CHINESE + ENGLISH, "1234 5678"]
    assert langid.many(texts) == [(lang, float(p)) for lang, p in (reference.classify(t[:langid.HEAD]) for t in texts)]
    assert langid(ENGLISH) == langid.many([ENGLISH])[0]


def test_rules_on_arrays_see_the_words_the_token_pattern_finds() -> None:
    for text in (ENGLISH, CHINESE, FRENCH, "a -- b ,, c\t漢字 x_y 𠀀𠀁 😀 ٣٤ Ⅻ", "", "   ", "....", WIKI):
        d = doc(text)
        tokens = quality._TOKEN.findall(text)
        words = [t for t in tokens if any(c.isalnum() for c in t)]
        assert d.words == words
        assert (d.view.n_tokens, d.view.alpha_tokens) == (len(tokens), sum(any(c.isalpha() for c in t) for t in tokens))
        assert d.view.digits == sum(c.isdigit() for c in text)
        assert d.view.non_space == sum(not c.isspace() for c in text)
        equal = {(a, b) for a in range(len(words)) for b in range(len(words)) if words[a] == words[b]}
        hashes = d.view.hashes.tolist()
        assert {(a, b) for a in range(len(words)) for b in range(len(words)) if hashes[a] == hashes[b]} == equal


def _gopher_top_ngrams(words: list[str], max_fractions: dict[int, float]) -> Drop | None:
    """Gopher's top n-gram rule on lists of words, as written before the array version."""
    total = sum(map(len, words))
    for n, max_frac in sorted(max_fractions.items()):
        if len(words) >= n and total:
            (top, count), = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1)).most_common(1)
            if count < 2:
                return None
            if (frac := sum(map(len, top)) * count / total) > max_frac:
                return Drop("top_ngram", f"top {n}-gram {' '.join(top)!r} x{count} covers {frac:.2f} > {max_frac:.2f}")
    return None


def _gopher_dup_ngrams(words: list[str], max_fractions: dict[int, float]) -> Drop | None:
    """Gopher's repeated n-gram rule on lists of words (non-overlapping, in order)."""
    total = sum(map(len, words))
    for n, max_frac in sorted(max_fractions.items()):
        if len(words) >= n and total:
            grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
            if len(set(grams)) == len(grams):
                return None
            seen: set[tuple[str, ...]] = set()
            repeated = i = 0
            while i < len(grams):
                if grams[i] in seen:
                    repeated, i = repeated + sum(map(len, grams[i])), i + n
                else:
                    seen.add(grams[i])
                    i += 1
            if (frac := repeated / total) > max_frac:
                return Drop("dup_ngrams", f"chars in repeated {n}-grams {frac:.2f} > {max_frac:.2f}")
    return None


def test_ngram_rules_on_arrays_decide_as_gopher_on_lists() -> None:
    """The array versions skip sizes whose counts cannot exceed the share (a longer n-gram never
    occurs more often than the top shorter one; the scan counts only repeated occurrences): on
    texts from small vocabularies, repeated a little or a lot, they decide as the list versions."""
    rng = random.Random(7)
    vocab = ["a", "of", "the", "river", "councillors", "approved", "it", "budget", "extraordinarily", "x"]
    thresholds = [{2: 0.2, 3: 0.18, 4: 0.16}, {2: 0.05, 3: 0.3, 4: 0.02}, {5: 0.15, 6: 0.14, 8: 0.12, 10: 0.1},
                  {5: 0.02, 7: 0.5, 9: 0.01}]
    decided = Counter()
    for _ in range(300):
        words = [rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(rng.randint(1, 20))]
        text = " ".join(words * rng.randint(1, 3) + [rng.choice(vocab) + str(i) for i in range(rng.randint(0, 300))])
        d = doc(text)
        for fractions in thresholds:
            for rule, gopher in ((quality.top_ngrams, _gopher_top_ngrams), (quality.dup_ngrams, _gopher_dup_ngrams)):
                assert rule(d, fractions) == gopher(d.words, fractions), (rule.__name__, fractions, text)
                decided[reason(rule(d, fractions))] += 1
    assert min(decided[None], decided["top_ngram"], decided["dup_ngrams"]) > 50  # both ways, often


def test_top_ngram_names_the_first_of_the_most_frequent() -> None:
    text = "alpha beta " * 6 + "gamma delta " * 6 + ENGLISH
    dropped = quality.top_ngrams(doc(text), {2: 0.05})
    assert dropped.detail.startswith("top 2-gram 'alpha beta' x6 covers")
