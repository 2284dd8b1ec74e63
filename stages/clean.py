"""clean: repair, de-markup, redact and filter every record before dedup.

Reads `corpus.parquet`, `instructions.parquet` and `preferences.parquet` from `paths.raw` and,
record by record:

1. repairs the text: lone surrogates replaced, mojibake fixed (ftfy), Unicode normal form,
   NUL and other control characters removed (tabs and newlines stay);
2. corpus only: strips markup by source (`markup` map, else detection): MediaWiki with a real
   parser (mwparserfromhell; templates, refs, tables, files, categories and reference
   sections dropped), HTML with trafilatura (stdlib parser as fallback);
3. redacts PII and secrets (emails, phones, IPs, API keys, tokens, private keys) with the
   placeholders of `stages.common.pii`, the same patterns `validate` checks;
4. corpus only: identifies the language (py3langid) and applies Gopher/C4-style quality and
   repetition rules, script-aware so Chinese and Japanese are measured in characters;
5. instructions and preferences: size and light checks (no answer, empty answer,
   identical preference pair).

Every rule is a small pure function returning `None` (keep) or `(reason, detail)`. Kept
records go to `paths.clean` (same layout; the corpus gains a `lang` column), every dropped
record to `paths.quarantine/<kind>.parquet` (id, source, reason, detail, record as JSON).
`reports/clean/` gets `samples_kept.jsonl` and `samples_dropped.jsonl`.

    python -m stages.clean [--params params.yaml]
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, partial
from html.parser import HTMLParser
from typing import Any, Literal

from pydantic import Field

from stages.common.config import Paths, StageConfig
from stages.common.io import KINDS, Tally, atomic_dir, read_records, write_jsonl, write_records
from stages.common.pii import redact
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.clean")

Markup = Literal["auto", "text", "mediawiki", "html"]

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
# Chinese function characters; a CJK document is tokenised per character, so each is a word.
ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "有", "不", "这", "为", "也", "与", "对", "将", "以", "之", "而", "等"]


class CleanConfig(StageConfig):
    # --- repair and markup ---
    unicode_form: Literal["NFC", "NFKC"] | None = "NFC"
    """Unicode normal form applied to every text (NFKC also folds full-width forms; null: none)."""
    fix_mojibake: bool = True
    """Repair encoding damage with ftfy (full-width CJK punctuation and curly quotes are kept)."""
    markup: dict[str, Markup] = {"wikipedia": "mediawiki"}
    """Markup of each corpus source, by source name: mediawiki, html, text or auto."""
    default_markup: Markup = "auto"
    """Markup of a corpus source the map does not name; auto detects HTML and wikitext."""
    wiki_drop_sections: list[str] = ["References", "External links", "See also", "Further reading",
                                     "Notes", "Footnotes", "Bibliography", "Sources", "Citations"]
    """Wiki sections dropped whole, matched by heading title (case-insensitive)."""
    redact_pii: bool = True
    """Replace PII and secrets with placeholders such as <EMAIL> (patterns in stages.common.pii)."""
    # --- size ---
    max_chars: int = Field(1_000_000, gt=0)
    """Longest record in characters (all its text fields together); longer ones drop as too_long."""
    # --- language ---
    languages: list[str] = ["en", "zh"]
    """Corpus languages kept (ISO 639-1 codes from py3langid); empty: any language."""
    min_lang_confidence: float = Field(0.5, ge=0, le=1)
    """Lowest language-identification probability for a corpus document to be kept."""
    language_aliases: dict[str, str] = {"wuu": "zh"}
    """Identifier labels read as another code (py3langid labels some standard Chinese news 'wuu')."""
    # --- Gopher quality (words: whitespace tokens; each CJK character is one word) ---
    min_words: int | None = 50
    """Fewest words in a corpus document (null: no rule)."""
    max_words: int | None = 100_000
    """Most words in a corpus document (null: no rule)."""
    min_mean_word_length: float | None = 3.0
    """Shortest mean word length in characters; not applied to CJK documents (null: no rule)."""
    max_mean_word_length: float | None = 10.0
    """Longest mean word length in characters; not applied to CJK documents (null: no rule)."""
    max_symbol_word_ratio: float | None = 0.1
    """Most '#' and ellipses per word (null: no rule)."""
    min_alpha_word_fraction: float | None = 0.8
    """Smallest share of tokens that hold a letter (null: no rule)."""
    max_digit_fraction: float | None = 0.25
    """Largest share of non-space characters that are digits (null: no rule)."""
    max_bullet_line_fraction: float | None = 0.9
    """Largest share of lines that start with a bullet (null: no rule)."""
    max_ellipsis_line_fraction: float | None = 0.3
    """Largest share of lines that end with an ellipsis (null: no rule)."""
    min_punct_line_fraction: float | None = 0.12
    """Smallest share of lines that end with terminal punctuation, C4-style (null: no rule)."""
    stop_words: dict[str, list[str]] = {"en": GOPHER_STOP_WORDS, "zh": ZH_STOP_WORDS}
    """Stop words per language; a document of a listed language must hold min_stop_words of them."""
    min_stop_words: int = 2
    """Fewest stop-word occurrences a document of a language in `stop_words` must hold."""
    # --- Gopher repetition ---
    max_dup_line_fraction: float | None = 0.3
    """Largest share of lines that repeat an earlier line (null: no rule)."""
    max_dup_line_char_fraction: float | None = 0.2
    """Largest share of characters in repeated lines (null: no rule)."""
    max_dup_paragraph_fraction: float | None = 0.3
    """Largest share of paragraphs that repeat an earlier paragraph (null: no rule)."""
    max_dup_paragraph_char_fraction: float | None = 0.2
    """Largest share of characters in repeated paragraphs (null: no rule)."""
    max_top_ngram_fraction: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    """n -> largest share of word characters covered by the most frequent n-gram."""
    max_dup_ngram_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    """n -> largest share of word characters inside n-grams that occur more than once."""
    cjk_ngram_scale: int = Field(2, ge=1)
    """CJK documents count n-grams in characters: an n-word rule looks at n x this many characters."""
    # --- reporting ---
    samples: int = 20
    """Kept records written to reports/clean/samples_kept.jsonl."""
    samples_per_reason: int = 5
    """Dropped records per reason written to reports/clean/samples_dropped.jsonl."""
    log_every: int = Field(500, gt=0)
    """Log a progress line every this many records."""


Drop = tuple[str, str]  # (reason, detail): reason is a stable snake_case metric key
Rule = Callable[["Doc"], "Drop | None"]


# --- 1. repair -------------------------------------------------------------------------------

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# C0 and C1 controls except \t and \n (\r is a line break, turned into \n first).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def repair(text: str, form: str | None = "NFC", fix_mojibake: bool = True) -> str:
    """`text` with surrogates resolved, encoding damage fixed, one normal form, no control chars."""
    if _SURROGATE.search(text):
        # Valid pairs (UTF-16 leftovers) are joined into their character, lone halves become U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if fix_mojibake:
        import ftfy

        # Width and quote folding would rewrite correct Chinese punctuation (，“”): not damage.
        text = ftfy.fix_text(text, fix_character_width=False, uncurl_quotes=False, normalization=None,
                             explain=False)
    if form:
        text = unicodedata.normalize(form, text)
    return _CONTROL.sub("", text)


# --- 2. markup -------------------------------------------------------------------------------

_WIKI_HINT = re.compile(r"\[\[[^\]\n]+\]\]|\{\{[^}\n]*|^==+[^=\n]+==+\s*$|'''", re.M)
_HTML_HINT = re.compile(r"<(?:!doctype|html|head|body|div|p|br|span|table|a\s|li|h[1-6])\b", re.I)
_WIKI_HIDDEN_NS = {"file", "image", "media", "category"}
_WIKI_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_WIKI_LEFTOVER_TAG = re.compile(r"</?(?:ref|references|blockquote|div|span|small|big|center|br|sup|sub|poem|"
                                r"onlyinclude|includeonly|noinclude|nowiki)\b[^>]*>", re.I)
_WIKI_HIDDEN_TAGS = {"table", "gallery", "ref", "references", "math", "timeline", "imagemap"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")


def detect_markup(text: str) -> str:
    """'html', 'mediawiki' or 'text', from the markup in the first 20k characters."""
    head = text[:20_000]
    if len(_HTML_HINT.findall(head)) >= 3:
        return "html"
    if len(_WIKI_HINT.findall(head)) >= 3:
        return "mediawiki"
    return "text"


def strip_wikitext(text: str, drop_sections: Iterable[str] = ()) -> str:
    """Readable text of a wiki page: templates, refs, tables, files, categories, comments and
    the named sections gone; links become their label ([[a|b]] -> b)."""
    import mwparserfromhell

    # References go before parsing: the parser leaves a <ref> it finds ambiguous as plain text.
    text = _WIKI_REF.sub("", text)
    code = mwparserfromhell.parse(text)
    names = [re.escape(s) for s in drop_sections]
    if names:
        pattern = r"^\s*(?:" + "|".join(names) + r")\s*$"
        for section in code.get_sections(matches=pattern, flags=re.I):
            _remove(code, section)
    # Emptied in place rather than removed: Wikicode.remove searches the whole tree per node.
    for tag in code.filter_tags(matches=lambda n: str(n.tag).lower() in _WIKI_HIDDEN_TAGS):
        tag.contents = ""
    for link in code.filter_wikilinks():
        title = str(link.title).strip()
        prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
        if prefix in _WIKI_HIDDEN_NS or (prefix and link.text is None and _INTERLANGUAGE.match(prefix)):
            link.title, link.text = "", None
    out = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    out = re.sub(r"__[A-Z]+__", "", out)  # magic words (__NOTOC__)
    # Table rows the parser could not see as a table (tables opened or closed inside templates).
    out = re.sub(r"(?m)^[ \t]*(?:\{\||\|\}|\|-|\||!).*$", "", out)
    out = re.sub(r"(?m)^[ \t]*\[\[(?:File|Image|Category):.*$", "", out)  # links the parser gave up on
    out = _WIKI_LEFTOVER_TAG.sub("", out)
    out = re.sub(r"(?m)^[ \t]+", "", out)  # indent left by list markers
    out = re.sub(r"\(\s*[,;:]?\s*\)", "", out)  # brackets left empty by removed templates
    out = re.sub(r"[ \t]+([,.;:])", r"\1", out)  # space left before punctuation by removed refs
    out = re.sub(r"[ \t]{2,}", " ", out)
    return out


def _remove(code: Any, node: Any) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing section
        pass


class _TextExtractor(HTMLParser):
    """Fallback HTML -> text: visible text, one line per block, scripts and styles dropped."""

    HIDDEN = {"script", "style", "noscript", "template", "head", "nav", "footer", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
             "article", "blockquote", "pre", "ul", "ol", "table", "header", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_to_text(text: str) -> str:
    """Main text of an HTML page: trafilatura, or the stdlib parser when it finds nothing."""
    try:
        import trafilatura

        out = trafilatura.extract(text, include_comments=False, include_tables=False, deduplicate=False)
    except Exception:  # trafilatura gives up on fragments and odd pages; the fallback does not
        out = None
    if out and out.strip():
        return out
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return html.unescape("\n".join(line for line in lines if line))


def strip_markup(text: str, markup: str, drop_sections: Iterable[str] = ()) -> str:
    if markup == "auto":
        markup = detect_markup(text)
    if markup == "mediawiki":
        return strip_wikitext(text, drop_sections)
    if markup == "html":
        return html_to_text(text)
    return text


def tidy(text: str) -> str:
    """Trailing spaces gone, at most one blank line in a row, no blank start or end."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --- 4. corpus rules -------------------------------------------------------------------------

# Scripts written without spaces: each character is one token ("word") for the rules below.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")
_BULLETS = ("•", "●", "◦", "‣", "⁃", "▪", "·", "-", "*", "–")
_ELLIPSES = ("...", "…")
# Terminal punctuation, Latin and CJK, then maybe closing quotes and a trailing parenthesis
# (Chinese news ends paragraphs with "。（新华社记者某某摄）").
_PUNCT_END = re.compile(r"[.!?;:。！？；：…][\"'”’」』》)\]）]*(?:\s*[（(][^（）()\n]{0,40}[）)])?$")


@dataclass
class Doc:
    """A corpus text with its language and the token/line views the rules share (computed once)."""

    text: str
    lang: str = ""
    lang_confidence: float = 1.0

    @cached_property
    def tokens(self) -> list[str]:
        """Whitespace tokens; every CJK character is a token of its own."""
        return _TOKEN.findall(self.text)

    @cached_property
    def words(self) -> list[str]:
        """Tokens holding a letter or digit (punctuation-only tokens are not words)."""
        return [t for t in self.tokens if any(c.isalnum() for c in t)]

    @cached_property
    def cjk(self) -> bool:
        """Mostly written in a script without spaces (Chinese, Japanese)."""
        words = self.words
        return bool(words) and sum(1 for w in words if len(w) == 1 and _IS_CJK.match(w)) > len(words) / 2

    @cached_property
    def lines(self) -> list[str]:
        return [s for line in self.text.split("\n") if (s := line.strip())]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for p in re.split(r"\n\s*\n", self.text) if (s := p.strip())]


def too_long(doc: Doc, max_chars: int) -> Drop | None:
    if len(doc.text) > max_chars:
        return "too_long", f"{len(doc.text)} chars > {max_chars}"
    return None


def language(doc: Doc, allowed: Iterable[str], min_confidence: float) -> Drop | None:
    allowed = list(allowed)
    if allowed and doc.lang not in allowed:
        return "wrong_language", f"{doc.lang} ({doc.lang_confidence:.2f}) not in {allowed}"
    if doc.lang_confidence < min_confidence:
        return "uncertain_language", f"{doc.lang} confidence {doc.lang_confidence:.2f} < {min_confidence:.2f}"
    return None


def word_count(doc: Doc, min_words: int | None, max_words: int | None) -> Drop | None:
    n = len(doc.words)
    unit = "chars+words" if doc.cjk else "words"
    if min_words is not None and n < min_words:
        return "too_few_words", f"{n} {unit} < {min_words}"
    if max_words is not None and n > max_words:
        return "too_many_words", f"{n} {unit} > {max_words}"
    return None


def mean_word_length(doc: Doc, lo: float | None, hi: float | None) -> Drop | None:
    if doc.cjk:  # one character per word by construction: the rule means nothing there
        return None
    words = [w for w in doc.words if not _IS_CJK.match(w)]
    if not words:
        return None
    mean = sum(len(w) for w in words) / len(words)
    if (lo is not None and mean < lo) or (hi is not None and mean > hi):
        return "mean_word_length", f"mean word length {mean:.1f} outside [{lo}, {hi}]"
    return None


def symbol_ratio(doc: Doc, max_ratio: float) -> Drop | None:
    n_words = max(len(doc.words), 1)
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
    ratio = symbols / n_words
    if ratio > max_ratio:
        return "symbol_ratio", f"symbol ratio {ratio:.2f} > {max_ratio:.2f}"
    return None


def alpha_words(doc: Doc, min_fraction: float) -> Drop | None:
    if not doc.tokens:
        return None
    frac = sum(1 for t in doc.tokens if any(c.isalpha() for c in t)) / len(doc.tokens)
    if frac < min_fraction:
        return "few_alpha_words", f"alphabetic token fraction {frac:.2f} < {min_fraction:.2f}"
    return None


def digit_fraction(doc: Doc, max_fraction: float) -> Drop | None:
    chars = [c for c in doc.text if not c.isspace()]
    if not chars:
        return None
    frac = sum(1 for c in chars if c.isdigit()) / len(chars)
    if frac > max_fraction:
        return "digit_ratio", f"digit fraction {frac:.2f} > {max_fraction:.2f}"
    return None


def bullet_lines(doc: Doc, max_fraction: float) -> Drop | None:
    if not doc.lines:
        return None
    frac = sum(1 for line in doc.lines if line.startswith(_BULLETS)) / len(doc.lines)
    if frac > max_fraction:
        return "bullet_lines", f"bullet line fraction {frac:.2f} > {max_fraction:.2f}"
    return None


def ellipsis_lines(doc: Doc, max_fraction: float) -> Drop | None:
    if not doc.lines:
        return None
    # The Chinese ellipsis "……" is ordinary punctuation, not a sign of a truncated snippet.
    frac = sum(1 for line in doc.lines if line.endswith(_ELLIPSES) and not line.endswith("……")) / len(doc.lines)
    if frac > max_fraction:
        return "ellipsis_lines", f"ellipsis line fraction {frac:.2f} > {max_fraction:.2f}"
    return None


def punct_lines(doc: Doc, min_fraction: float) -> Drop | None:
    if not doc.lines:
        return None
    frac = sum(1 for line in doc.lines if _PUNCT_END.search(line)) / len(doc.lines)
    if frac < min_fraction:
        return "few_punct_lines", f"punctuated line fraction {frac:.2f} < {min_fraction:.2f}"
    return None


def stop_words(doc: Doc, words_by_lang: dict[str, list[str]], min_count: int) -> Drop | None:
    wanted = words_by_lang.get(doc.lang)
    if not wanted:
        return None
    wanted_set = set(wanted)
    found = sum(1 for w in doc.words if w.lower().strip(".,;:!?\"'()") in wanted_set)
    if found < min_count:
        return "no_stop_words", f"{found} {doc.lang} stop words < {min_count}"
    return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, characters in repeated items), counting repeats after the first."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def dup_lines(doc: Doc, max_fraction: float | None, max_char_fraction: float | None) -> Drop | None:
    return _dup_units(doc, doc.lines, "line", max_fraction, max_char_fraction)


def dup_paragraphs(doc: Doc, max_fraction: float | None, max_char_fraction: float | None) -> Drop | None:
    return _dup_units(doc, doc.paragraphs, "paragraph", max_fraction, max_char_fraction)


def _dup_units(doc: Doc, units: list[str], unit: str, max_fraction: float | None,
               max_char_fraction: float | None) -> Drop | None:
    if not units:
        return None
    n, chars = _duplicates(units)
    if max_fraction is not None and n / len(units) > max_fraction:
        return f"dup_{unit}s", f"duplicate {unit} fraction {n / len(units):.2f} > {max_fraction:.2f}"
    total = max(sum(len(u) for u in units), 1)
    if max_char_fraction is not None and chars / total > max_char_fraction:
        return f"dup_{unit}_chars", f"chars in duplicate {unit}s {chars / total:.2f} > {max_char_fraction:.2f}"
    return None


def top_ngrams(doc: Doc, max_fractions: dict[int, float], cjk_scale: int = 1) -> Drop | None:
    """Gopher: the most frequent n-gram may cover at most a share of the word characters."""
    words = doc.words
    total = sum(len(w) for w in words)
    scale = cjk_scale if doc.cjk else 1
    for n, max_frac in sorted(max_fractions.items()):
        n *= scale
        if len(words) < n or not total:
            continue
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count < 2:
            continue
        frac = sum(len(w) for w in gram) * count / total
        if frac > max_frac:
            shown = ("" if doc.cjk else " ").join(gram)
            return "top_ngram", f"top {n}-gram {shown!r} x{count} covers {frac:.2f} > {max_frac:.2f}"
    return None


def dup_ngrams(doc: Doc, max_fractions: dict[int, float], cjk_scale: int = 1) -> Drop | None:
    """Gopher: word characters inside repeated n-grams (non-overlapping) may be at most a share."""
    words = doc.words
    total = sum(len(w) for w in words)
    scale = cjk_scale if doc.cjk else 1
    for n, max_frac in sorted(max_fractions.items()):
        n *= scale
        if len(words) < n or not total:
            continue
        seen: set[tuple[str, ...]] = set()
        repeated = i = 0
        while i <= len(words) - n:
            gram = tuple(words[i:i + n])
            if gram in seen:
                repeated += sum(len(w) for w in gram)
                i += n
            else:
                seen.add(gram)
                i += 1
        frac = repeated / total
        if frac > max_frac:
            return "dup_ngrams", f"chars in repeated {n}-grams {frac:.2f} > {max_frac:.2f}"
    return None


def corpus_rules(cfg: CleanConfig) -> list[Rule]:
    """The corpus rules in the order they run (first failing rule names the reason);
    a threshold set to null leaves its rule out."""
    # Length before language: identification is unreliable on a headline, which is "too short".
    rules: list[Rule] = [partial(too_long, max_chars=cfg.max_chars),
                         partial(word_count, min_words=cfg.min_words, max_words=cfg.max_words),
                         partial(language, allowed=cfg.languages, min_confidence=cfg.min_lang_confidence)]
    optional: list[tuple[Callable[..., Drop | None], dict[str, Any]]] = [
        (dup_lines, {"max_fraction": cfg.max_dup_line_fraction, "max_char_fraction": cfg.max_dup_line_char_fraction}),
        (dup_paragraphs, {"max_fraction": cfg.max_dup_paragraph_fraction,
                          "max_char_fraction": cfg.max_dup_paragraph_char_fraction}),
        (top_ngrams, {"max_fractions": cfg.max_top_ngram_fraction or None, "cjk_scale": cfg.cjk_ngram_scale}),
        (dup_ngrams, {"max_fractions": cfg.max_dup_ngram_fraction or None, "cjk_scale": cfg.cjk_ngram_scale}),
        (mean_word_length, {"lo": cfg.min_mean_word_length, "hi": cfg.max_mean_word_length}),
        (symbol_ratio, {"max_ratio": cfg.max_symbol_word_ratio}),
        (alpha_words, {"min_fraction": cfg.min_alpha_word_fraction}),
        (digit_fraction, {"max_fraction": cfg.max_digit_fraction}),
        (bullet_lines, {"max_fraction": cfg.max_bullet_line_fraction}),
        (ellipsis_lines, {"max_fraction": cfg.max_ellipsis_line_fraction}),
        (punct_lines, {"min_fraction": cfg.min_punct_line_fraction}),
        (stop_words, {"words_by_lang": cfg.stop_words or None, "min_count": cfg.min_stop_words}),
    ]
    for rule, kwargs in optional:
        if any(v is not None for k, v in kwargs.items() if k not in ("min_count", "cjk_scale")):
            rules.append(partial(rule, **kwargs))
    return rules


# --- the stage -------------------------------------------------------------------------------


class LanguageId:
    """py3langid with normalised probabilities (its model ships inside the package)."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> tuple[str, float]:
        lang, prob = self.model.classify(text[:20_000])  # a long page's head says enough
        return lang, float(prob)


@dataclass
class Cleaner:
    """Cleans one record of any kind: returns the cleaned record, or a Drop."""

    cfg: CleanConfig
    langid: Callable[[str], tuple[str, float]] | None = None
    rules: list[Rule] = field(default_factory=list)
    redacted: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rules = corpus_rules(self.cfg)

    def text(self, text: str | None) -> tuple[str, Counter[str]]:
        text = repair(text or "", self.cfg.unicode_form, self.cfg.fix_mojibake)
        counts: Counter[str] = Counter()
        if self.cfg.redact_pii:
            text, found = redact(text)
            counts.update(found)
        return text, counts

    def corpus(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        raw = record.get("text") or ""
        if len(raw) > self.cfg.max_chars:  # before any work: a huge record must not stall the stage
            return "too_long", f"{len(raw)} chars > {self.cfg.max_chars}"
        text = repair(raw, self.cfg.unicode_form, self.cfg.fix_mojibake)
        markup = self.cfg.markup.get(record.get("source") or "", self.cfg.default_markup)
        try:
            text = strip_markup(text, markup, self.cfg.wiki_drop_sections)
        except Exception as err:  # a page the parser cannot read is quarantined, not fatal
            return "markup_error", f"{markup}: {type(err).__name__}: {err}"[:200]
        text = tidy(text)
        counts: Counter[str] = Counter()
        if self.cfg.redact_pii:
            text, found = redact(text)
            counts.update(found)
        if not text.strip():
            return "empty", f"no text left after {markup} cleaning"
        lang, conf = self.langid(text) if self.langid else ("", 1.0)
        lang = self.cfg.language_aliases.get(lang, lang)
        doc = Doc(text, lang, conf)
        for rule in self.rules:
            dropped = rule(doc)
            if dropped:
                return dropped
        self.redacted.update(counts)
        return {**record, "text": text, "lang": lang}

    def instructions(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        messages = record.get("messages") or []
        size = sum(len(m.get("content") or "") for m in messages)
        if size > self.cfg.max_chars:
            return "too_long", f"{size} chars > {self.cfg.max_chars}"
        if not any(m.get("role") == "assistant" for m in messages):
            return "no_answer", f"roles {[m.get('role') for m in messages]} hold no assistant message"
        counts: Counter[str] = Counter()
        cleaned = []
        for i, m in enumerate(messages):
            content, found = self.text(m.get("content"))
            counts.update(found)
            if not content.strip():
                reason = "empty_answer" if m.get("role") == "assistant" else "empty_prompt"
                return reason, f"message {i} ({m.get('role')}) is empty"
            cleaned.append({**m, "content": content})
        self.redacted.update(counts)
        return {**record, "messages": cleaned}

    def preferences(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        size = sum(len(record.get(f) or "") for f in ("prompt", "chosen", "rejected"))
        if size > self.cfg.max_chars:
            return "too_long", f"{size} chars > {self.cfg.max_chars}"
        counts: Counter[str] = Counter()
        out = dict(record)
        for name in ("prompt", "chosen", "rejected"):
            out[name], found = self.text(record.get(name))
            counts.update(found)
            if not out[name].strip():
                return ("empty_prompt" if name == "prompt" else "empty_answer"), f"{name} is empty"
        if out["chosen"].strip() == out["rejected"].strip():
            return "identical_pair", "chosen == rejected"
        self.redacted.update(counts)
        return out


QUARANTINE_FIELDS = ("id", "source", "reason", "detail", "record")


def _preview(kind: str, record: dict[str, Any], limit: int = 500) -> str:
    if kind == "instructions":
        text = "\n\n".join(f"[{m.get('role')}] {m.get('content') or ''}" for m in record.get("messages") or [])
    elif kind == "preferences":
        text = f"{record.get('prompt')}\n\n[chosen] {record.get('chosen')}\n\n[rejected] {record.get('rejected')}"
    else:
        text = record.get("text") or ""
    return text if len(text) <= limit else text[:limit] + "…"


def write_quarantine(folder: Any, kind: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in QUARANTINE_FIELDS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"{kind}.parquet", compression="zstd")


def run(cfg: CleanConfig, paths: Paths) -> dict:
    cleaner = Cleaner(cfg, LanguageId())
    report = paths.report_dir("clean")
    report.mkdir(parents=True, exist_ok=True)

    total = Tally()
    kinds: dict[str, Any] = {}
    kept: dict[str, list[dict[str, Any]]] = {}
    quarantined: dict[str, list[dict[str, Any]]] = {}
    languages: Counter[str] = Counter()
    kept_samples: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    dropped_samples: dict[str, list[dict[str, Any]]] = defaultdict(list)

    for kind in KINDS:
        records = read_records(paths.raw, kind)
        clean_one = getattr(cleaner, kind)
        tally = Tally()
        kept[kind], quarantined[kind] = [], []
        started = time.perf_counter()
        for i, record in enumerate(records, 1):
            tally.docs_in += 1
            result = clean_one(record)
            if isinstance(result, tuple):
                reason, detail = result
                tally.drop(reason)
                quarantined[kind].append({
                    "id": record.get("id"), "source": record.get("source"), "reason": reason, "detail": detail,
                    "record": json.dumps(record, ensure_ascii=False, default=str)})
                if len(dropped_samples[reason]) < cfg.samples_per_reason:
                    dropped_samples[reason].append({"kind": kind, "id": record.get("id"), "source": record.get("source"),
                                                    "reason": reason, "detail": detail, "text": _preview(kind, record)})
            else:
                tally.docs_out += 1
                kept[kind].append(result)
                if kind == "corpus":
                    languages[result["lang"]] += 1
                group = kept_samples[(kind, record.get("source") or "")]
                if len(group) < cfg.samples:
                    group.append({"kind": kind, "id": result.get("id"), "source": result.get("source"),
                                  **({"lang": result["lang"]} if kind == "corpus" else {}),
                                  "text": _preview(kind, result)})
            if i % cfg.log_every == 0 or i == len(records):
                rate = i / max(time.perf_counter() - started, 1e-9)
                log.info("clean %s: %d/%d records (%.0f/s, ETA %.0fs), kept %d", kind, i, len(records), rate,
                         (len(records) - i) / rate, tally.docs_out)
        tally.check(f"clean {kind}")
        kinds[kind] = tally.as_metrics()
        total.merge(tally)

    with atomic_dir(paths.clean) as tmp:
        for kind in KINDS:
            write_records(tmp, kind, kept[kind], extra=("lang",) if kind == "corpus" else ())
    with atomic_dir(paths.quarantine) as tmp:
        for kind in KINDS:
            write_quarantine(tmp, kind, quarantined[kind])

    # Kept samples spread over every (kind, source), round robin.
    groups = list(kept_samples.values())
    spread = [g[i] for i in range(cfg.samples) for g in groups if i < len(g)][: cfg.samples]
    write_jsonl(report / "samples_kept.jsonl", spread)
    write_jsonl(report / "samples_dropped.jsonl", [s for reason in sorted(dropped_samples) for s in dropped_samples[reason]])

    total.check("clean")
    return {**total.as_metrics(), "kinds": kinds,
            "redacted": dict(sorted(cleaner.redacted.items())),
            "languages": dict(languages.most_common())}


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", CleanConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
