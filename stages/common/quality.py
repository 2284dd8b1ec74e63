"""Quality rules for `clean`: Gopher/C4-style checks of one corpus document, script-aware.

Two kinds of rule, as in C4 and datatrove. A line rule `rule(line) -> reason | None` judges one
line (menus, buttons, cookie notices, symbol rows): `remove_lines` takes the lines it names out
of the text and counts them, and `too_little_left` drops the document only when what is left is
too little. A document rule `rule(doc, *thresholds) -> Drop | None` judges the whole text: `None`
keeps it, a `Drop` names the reason (a stable snake_case metric key) and the measured value.
`Doc` computes the token, word, line and paragraph views once for all rules; CJK text (no
spaces) counts each character as a word (`stages.common.text.CJK`). `line_rules` and
`corpus_rules` turn the `clean` config into the rules in the order they run. No files.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

from stages.common.io import Drop
from stages.common.text import CJK, CJK_CHAR

Rule = Callable[["Doc"], "Drop | None"]

_TOKEN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")
_BULLETS = ("•", "●", "◦", "‣", "⁃", "▪", "·", "-", "*", "–")
_ELLIPSES = ("...", "…")
# Terminal punctuation, Latin and CJK, then maybe closing quotes and a trailing parenthesis
# (Chinese news ends paragraphs with "。（新华社记者某某摄）").
_PUNCT_END = re.compile(r"[.!?;:。！？；：…][\"'”’」』》)\]）]*(?:\s*[（(][^（）()\n]{0,40}[）)])?$")
# A sentence end inside a line: a Latin stop followed by a capital or digit; in CJK a full stop
# or a clause comma (headlines, menus and lists of names do without them).
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+[\"'“‘(\[]?[A-Z0-9]|[。！？；，]")


@dataclass
class Doc:
    """A corpus text with its language and the token/line views the rules share (computed once).

    The rules read the words as arrays (`words_view`, a `Words`), so that no rule loops over the
    words in Python; `tokens` and `words` give the same views as lists of strings."""

    text: str
    lang: str
    lang_confidence: float
    words_view: Words | None = None
    """The text's `Words` when the caller has them already (None: computed here)."""

    def __post_init__(self) -> None:
        if self.words_view is None:
            self.words_view = Words.of(self.text)

    @property
    def view(self) -> Words:
        return self.words_view  # type: ignore[return-value]

    @cached_property
    def tokens(self) -> list[str]:
        """Whitespace tokens; every CJK character is a token of its own."""
        return _TOKEN.findall(self.text)

    @cached_property
    def words(self) -> list[str]:
        """Tokens holding a letter or digit (punctuation-only tokens are not words)."""
        return self.view.strings(self.text, 0, self.view.n_words)

    @cached_property
    def cjk(self) -> bool:
        """Mostly written in a script counted by characters (Chinese, Japanese, Korean)."""
        return self.view.n_words > 0 and self.view.n_cjk > self.view.n_words / 2

    @cached_property
    def lines(self) -> list[str]:
        return [s for line in self.text.split("\n") if (s := line.strip())]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for p in re.split(r"\n\s*\n", self.text) if (s := p.strip())]


_SPACE, _CJK_FLAG, _ALNUM, _ALPHA, _DIGIT = 1, 2, 4, 8, 16


def _char_flags(c: str) -> int:
    """What the rules ask of a character: whitespace (`str.isspace`, which is what `\\s` matches),
    a CJK character, a letter or digit, a letter, a digit (`str.isdigit`)."""
    return ((_SPACE if c.isspace() else 0) | (_CJK_FLAG if CJK_CHAR.match(c) else 0)
            | (_ALNUM if c.isalnum() else 0) | (_ALPHA if c.isalpha() else 0) | (_DIGIT if c.isdigit() else 0))


@functools.cache
def _flag_table() -> Any:
    """`_char_flags` of every code point below 0x10000, as a lookup table."""
    import numpy as np

    return np.fromiter(map(_char_flags, map(chr, range(0x10000))), np.uint8, 0x10000)


def _mix(x: Any) -> Any:
    """MurmurHash3's 64-bit finalizer over a uint64 array."""
    import numpy as np

    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


class Words:
    """A text's tokens and words as arrays, from one pass over its code points: a token is a run
    of non-space, non-CJK characters or one CJK character (what `_TOKEN` finds), a word a token
    holding a letter or digit. Counts are Python ints, so a rule's arithmetic and message are
    what they were on lists of strings."""

    def __init__(self, codes: Any, flags: Any) -> None:
        import numpy as np

        in_token = (flags & _SPACE) == 0
        cjk = (flags & _CJK_FLAG) != 0
        run = in_token & ~cjk
        starts = cjk | run
        starts[1:] &= cjk[1:] | ~run[:-1]  # a token starts at a CJK character or where a run starts
        chars = np.flatnonzero(in_token)
        first = np.flatnonzero(starts[chars])  # each token's first character, among `chars`
        token_flags = np.bitwise_or.reduceat(flags[chars], first) if first.size else np.zeros(0, np.uint8)
        length = np.diff(first, append=chars.size)
        word = (token_flags & _ALNUM) != 0
        self.n_tokens = int(first.size)
        self.alpha_tokens = int(np.count_nonzero(token_flags & _ALPHA))
        """Tokens holding a letter."""
        self.non_space = int(chars.size)
        """Characters that are not whitespace."""
        self.digits = int(np.count_nonzero(flags & _DIGIT))
        """Characters that are digits (`str.isdigit`; no whitespace is one)."""
        self.start = chars[first[word]]
        """Each word's first character (a position in the text)."""
        self.length = length[word]
        """Each word's length in characters."""
        self.n_words = int(self.length.size)
        self.n_cjk = int(np.count_nonzero(token_flags[word] & _CJK_FLAG))
        """Words that are one CJK character."""
        self.chars = int(self.length.sum())
        """Characters in words."""
        self._codes, self._word_chars = codes, (chars, first, word, length)
        self._keys: tuple[int, Any] | None = None

    @classmethod
    def of(cls, text: str) -> Words:
        import numpy as np

        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        flags = _flag_table()[np.minimum(codes, 0xFFFF)]
        astral = np.flatnonzero(codes > 0xFFFF)
        if astral.size:
            flags[astral] = [_char_flags(chr(c)) for c in codes[astral].tolist()]
        return cls(codes, flags)

    @cached_property
    def hashes(self) -> Any:
        """A 64-bit hash of each word's characters: equal words, equal hashes; two different
        words share one with a chance of about one in 2^64."""
        import numpy as np

        chars, first, word, length = self._word_chars
        at = chars[np.repeat(word, length)]  # the word characters, word after word
        first_of_word = np.cumsum(self.length) - self.length
        within = np.arange(at.size, dtype=np.uint64) - np.repeat(first_of_word, self.length).astype(np.uint64)
        with np.errstate(over="ignore"):  # the arithmetic wraps around on purpose
            mixed = _mix(self._codes[at].astype(np.uint64) + (within << np.uint64(21)))
            return _mix(np.add.reduceat(mixed, first_of_word) + self.length.astype(np.uint64)) if at.size else mixed

    def ngram_keys(self, n: int) -> Any:
        """A 64-bit key of each run of n words: equal n-grams, equal keys (two different ones
        share one with a chance of about one in 2^64). Asked for in growing n, each size costs one
        step from the last."""
        import numpy as np

        have, key = self._keys if self._keys and self._keys[0] <= n else (0, np.zeros(self.n_words + 1, np.uint64))
        h = self.hashes
        with np.errstate(over="ignore"):  # the arithmetic wraps around on purpose
            for k in range(have, n):
                key = (key[: self.n_words - k] ^ h[k:]) * np.uint64(0x9E3779B97F4A7C15)
                key ^= key >> np.uint64(29)
        self._keys = (n, key)
        return key

    @cached_property
    def _ends(self) -> Any:
        import numpy as np

        return np.concatenate(([0], np.cumsum(self.length)))

    def ngram_chars(self, n: int) -> Any:
        """The word characters of each run of n words."""
        return self._ends[n:] - self._ends[:-n]

    def strings(self, text: str, lo: int, hi: int) -> list[str]:
        """Words lo..hi-1 as strings."""
        return [text[a: a + n] for a, n in zip(self.start[lo:hi].tolist(), self.length[lo:hi].tolist())]


# --- C4 line rules: an offending line is removed, not the document ------------------------------

LineRule = Callable[[str], "str | None"]


def _line_words(line: str) -> int:
    return sum(1 for t in _TOKEN.findall(line) if any(c.isalnum() for c in t))


def unpunctuated_line(line: str, prose_min_words: int) -> str | None:
    """C4: a line that ends without terminal punctuation (a menu entry, button, heading) goes. A
    line of `prose_min_words` words or more that holds a sentence end is prose whose last stop
    is missing (a one-line article cut at its end) and stays."""
    if _PUNCT_END.search(line) or (_line_words(line) >= prose_min_words and _SENTENCE_END.search(line)):
        return None
    return "no_terminal_punct"


def letterless_line(line: str) -> str | None:
    """A line without a single letter (rules, digit rows, symbol soup) goes; CJK characters are letters."""
    return None if any(c.isalpha() for c in line) else "no_letters"


def phrase_line(line: str, phrases: dict[str, list[str]]) -> str | None:
    """C4: a line that mentions one of a reason's lowercase `phrases` (case-insensitive: javascript,
    cookie notices) goes, under the first such reason; one rule for all reasons lowers a line once."""
    low = line.lower()
    return next((reason for reason, found in phrases.items() if any(p in low for p in found)), None)


@dataclass
class LineCut:
    """What the line rules left of a text: the text, and reason -> lines and characters removed."""

    text: str
    lines: Counter[str]
    chars: Counter[str]
    examples: dict[str, str]
    removed: list[str]
    """The removed lines (stripped)."""

    @cached_property
    def words(self) -> Words:
        """The words of what is left (the document rules read them too)."""
        return Words.of(self.text)


def remove_lines(text: str, rules: list[LineRule]) -> LineCut:
    """`text` without the lines a rule names (the first rule that names a line counts it); blank
    lines and line order stay."""
    kept: list[str] = []
    lines: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    examples: dict[str, str] = {}
    removed: list[str] = []
    for line in text.split("\n"):
        stripped = line.strip()
        reason = next((r for rule in rules if (r := rule(stripped))), None) if stripped else None
        if reason is None:
            kept.append(line)
            continue
        lines[reason] += 1
        chars[reason] += len(stripped)
        examples.setdefault(reason, stripped[:200])
        removed.append(stripped)
    left = "\n".join(kept)
    if "\n\n\n" in left:  # the regex only where it has something to do (a plain scan costs far less)
        left = re.sub(r"\n{3,}", "\n\n", left)
    return LineCut(left.strip(), lines, chars, examples, removed)


def too_little_left(cut: LineCut, min_kept_fraction: float, min_words: int | None) -> Drop | None:
    """The document goes when the line rules removed more than a share of its words (CJK
    characters counted one each, so scripts compare), or left fewer than `min_words` of a text
    that had them; the reason names the rule that removed the most characters."""
    if not cut.lines:
        return None
    # No word spans a line break, so the text's words are those left plus those of the removed lines.
    after = cut.words.n_words
    before = after + Words.of("\n".join(cut.removed)).n_words
    share = after / max(before, 1)
    if share >= min_kept_fraction and (min_words is None or after >= min_words or before < min_words):
        return None
    removed = ", ".join(f"{n} {reason}" for reason, n in cut.lines.most_common())
    return Drop(f"{cut.chars.most_common(1)[0][0]}_lines",
                f"line rules left {after} of {before} words ({share:.0%}; needs {min_kept_fraction:.0%}"
                f"{f' and {min_words} words' if min_words else ''}); lines removed: {removed}")


def line_rules(cfg: Any) -> list[LineRule]:
    """The line rules of a `clean` config (`stages.clean.CleanConfig`) in the order they run."""
    rules: list[LineRule] = []
    if cfg.remove_letterless_lines:
        rules.append(letterless_line)
    if cfg.line_drop_phrases:
        rules.append(partial(phrase_line, phrases={reason: [p.lower() for p in phrases]
                                                   for reason, phrases in cfg.line_drop_phrases.items()}))
    if cfg.remove_unpunctuated_lines:
        rules.append(partial(unpunctuated_line, prose_min_words=cfg.prose_line_min_words))
    return rules


# --- size and language -------------------------------------------------------------------------


def too_long(doc: Doc, max_chars: int) -> Drop | None:
    if len(doc.text) > max_chars:
        return Drop("too_long", f"{len(doc.text)} chars > {max_chars}")
    return None


def language(doc: Doc, allowed: Iterable[str], min_confidence: float) -> Drop | None:
    allowed = list(allowed)
    if allowed and doc.lang not in allowed:
        return Drop("wrong_language", f"{doc.lang} ({doc.lang_confidence:.2f}) not in {allowed}")
    if doc.lang_confidence < min_confidence:
        return Drop("uncertain_language", f"{doc.lang} confidence {doc.lang_confidence:.2f} < {min_confidence:.2f}")
    return None


# --- Gopher quality ----------------------------------------------------------------------------


def word_count(doc: Doc, min_words: int | None, max_words: int | None) -> Drop | None:
    n = doc.view.n_words
    unit = "chars+words" if doc.cjk else "words"
    if min_words is not None and n < min_words:
        return Drop("too_few_words", f"{n} {unit} < {min_words}")
    if max_words is not None and n > max_words:
        return Drop("too_many_words", f"{n} {unit} > {max_words}")
    return None


def mean_word_length(doc: Doc, lo: float | None, hi: float | None) -> Drop | None:
    if doc.cjk:  # one character per word by construction: the rule means nothing there
        return None
    view = doc.view
    n = view.n_words - view.n_cjk  # the CJK characters among the words do not count
    if not n:
        return None
    mean = (view.chars - view.n_cjk) / n
    if (lo is not None and mean < lo) or (hi is not None and mean > hi):
        return Drop("mean_word_length", f"mean word length {mean:.1f} outside [{lo}, {hi}]")
    return None


def symbol_ratio(doc: Doc, max_ratio: float) -> Drop | None:
    n_words = max(doc.view.n_words, 1)
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
    ratio = symbols / n_words
    if ratio > max_ratio:
        return Drop("symbol_ratio", f"symbol ratio {ratio:.2f} > {max_ratio:.2f}")
    return None


def alpha_words(doc: Doc, min_fraction: float) -> Drop | None:
    view = doc.view
    if not view.n_tokens:
        return None
    frac = view.alpha_tokens / view.n_tokens
    if frac < min_fraction:
        return Drop("few_alpha_words", f"alphabetic token fraction {frac:.2f} < {min_fraction:.2f}")
    return None


def digit_fraction(doc: Doc, max_fraction: float) -> Drop | None:
    view = doc.view
    if not view.non_space:
        return None
    frac = view.digits / view.non_space
    if frac > max_fraction:
        return Drop("digit_ratio", f"digit fraction {frac:.2f} > {max_fraction:.2f}")
    return None


def _line_fraction(doc: Doc, test: Callable[[str], bool]) -> float:
    return sum(1 for line in doc.lines if test(line)) / len(doc.lines)


def bullet_lines(doc: Doc, max_fraction: float) -> Drop | None:
    if doc.lines and (frac := _line_fraction(doc, lambda line: line.startswith(_BULLETS))) > max_fraction:
        return Drop("bullet_lines", f"bullet line fraction {frac:.2f} > {max_fraction:.2f}")
    return None


def ellipsis_lines(doc: Doc, max_fraction: float) -> Drop | None:
    # The Chinese ellipsis "……" is ordinary punctuation, not a sign of a truncated snippet.
    def cut(line: str) -> bool:
        return line.endswith(_ELLIPSES) and not line.endswith("……")

    if doc.lines and (frac := _line_fraction(doc, cut)) > max_fraction:
        return Drop("ellipsis_lines", f"ellipsis line fraction {frac:.2f} > {max_fraction:.2f}")
    return None


def drop_phrases(doc: Doc, phrases: list[str]) -> Drop | None:
    """C4: a page that holds one of `phrases` (case-insensitive: "lorem ipsum") is placeholder text."""
    low = doc.text.lower()
    if found := next((p for p in phrases if p.lower() in low), None):
        return Drop("drop_phrase", f"holds {found!r}")
    return None


def stop_words(doc: Doc, words_by_lang: dict[str, list[str]], min_count: int) -> Drop | None:
    wanted = words_by_lang.get(doc.lang)
    if not wanted:
        return None
    wanted_set = set(wanted)
    text, view = doc.text, doc.view
    found = 0
    # Word by word from the start, until enough are found: prose shows its stop words early.
    for at, n in zip(view.start.tolist(), view.length.tolist()):
        if text[at: at + n].lower().strip(".,;:!?\"'()") in wanted_set:
            found += 1
            if found >= min_count:
                return None
    return Drop("no_stop_words", f"{found} {doc.lang} stop words < {min_count}")


# --- Gopher repetition -------------------------------------------------------------------------


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
    return _dup_units(doc.lines, "line", max_fraction, max_char_fraction)


def dup_paragraphs(doc: Doc, max_fraction: float | None, max_char_fraction: float | None) -> Drop | None:
    return _dup_units(doc.paragraphs, "paragraph", max_fraction, max_char_fraction)


def _dup_units(units: list[str], unit: str, max_fraction: float | None,
               max_char_fraction: float | None) -> Drop | None:
    if not units:
        return None
    n, chars = _duplicates(units)
    if max_fraction is not None and n / len(units) > max_fraction:
        return Drop(f"dup_{unit}s", f"duplicate {unit} fraction {n / len(units):.2f} > {max_fraction:.2f}")
    total = max(sum(len(u) for u in units), 1)
    if max_char_fraction is not None and chars / total > max_char_fraction:
        return Drop(f"dup_{unit}_chars", f"chars in duplicate {unit}s {chars / total:.2f} > {max_char_fraction:.2f}")
    return None


def _ngram_sizes(doc: Doc, max_fractions: dict[int, float], cjk_scale: int) -> Iterable[tuple[int, float, int]]:
    """(n, largest share, word characters) for each n-gram size a document is long enough for;
    a CJK document counts n x `cjk_scale` characters as an n-gram."""
    total = doc.view.chars
    scale = cjk_scale if doc.cjk else 1
    for n, max_frac in sorted(max_fractions.items()):
        if doc.view.n_words >= n * scale and total:
            yield n * scale, max_frac, total


def top_ngrams(doc: Doc, max_fractions: dict[int, float], cjk_scale: int = 1) -> Drop | None:
    """Gopher: the most frequent n-gram may cover at most a share of the word characters."""
    import numpy as np

    view = doc.view
    ceiling: int | None = None  # the top count of a shorter size: no longer n-gram occurs more often
    for n, max_frac, total in _ngram_sizes(doc, max_fractions, cjk_scale):
        spans = view.ngram_chars(n)
        if ceiling is not None and int(spans.max()) * ceiling / total <= max_frac:
            continue  # not even the longest n-gram at the ceiling's count would cover too much
        keys = view.ngram_keys(n)
        ordered = np.sort(keys)
        bounds = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, [ordered.size]))
        counts = bounds[1:] - bounds[:-1]
        count = ceiling = int(counts.max())
        if count < 2:
            return None  # no n-gram repeats, so no longer one does either
        if int(spans.max()) * count / total <= max_frac:
            continue  # not even the longest n-gram would cover too much that often
        top = ordered[bounds[:-1][counts == count]]
        at = int(np.flatnonzero(np.isin(keys, top))[0])  # of the most frequent, the first seen (as Counter picks)
        frac = int(spans[at]) * count / total
        if frac > max_frac:
            shown = ("" if doc.cjk else " ").join(view.strings(doc.text, at, at + n))
            return Drop("top_ngram", f"top {n}-gram {shown!r} x{count} covers {frac:.2f} > {max_frac:.2f}")
    return None


def dup_ngrams(doc: Doc, max_fractions: dict[int, float], cjk_scale: int = 1) -> Drop | None:
    """Gopher: word characters inside repeated n-grams (non-overlapping) may be at most a share."""
    import numpy as np

    view = doc.view
    for n, max_frac, total in _ngram_sizes(doc, max_fractions, cjk_scale):
        keys = view.ngram_keys(n)
        ordered = np.sort(keys)
        repeats = int(np.count_nonzero(ordered[1:] == ordered[:-1]))  # occurrences after an n-gram's first
        if not repeats:
            return None  # no n-gram repeats, so no longer one does either
        spans_array = view.ngram_chars(n)
        if repeats * int(spans_array.max()) / total <= max_frac:
            continue  # the scan counts some of those occurrences, none longer than the longest n-gram
        # Every n-gram before the first repeat is new; from there the scan skips a repeated
        # n-gram whole, so it runs in order.
        order = np.argsort(keys, kind="stable")
        i = int(order[1:][keys[order[1:]] == keys[order[:-1]]].min())  # the first occurrence that is not a first
        spans = spans_array.tolist()
        key_list = keys.tolist()
        seen = set(key_list[:i])
        repeated = 0
        last = len(key_list) - 1
        while i <= last:
            key = key_list[i]
            if key in seen:
                repeated += spans[i]
                i += n
            else:
                seen.add(key)
                i += 1
        frac = repeated / total
        if frac > max_frac:
            return Drop("dup_ngrams", f"chars in repeated {n}-grams {frac:.2f} > {max_frac:.2f}")
    return None


def corpus_rules(cfg: Any) -> list[Rule]:
    """The rules of a `clean` config (`stages.clean.CleanConfig`) in the order they run (the
    first failing rule names the reason); a threshold set to null leaves its rule out."""
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
        (drop_phrases, {"phrases": cfg.drop_phrases or None}),
        (stop_words, {"words_by_lang": cfg.stop_words or None, "min_count": cfg.min_stop_words}),
    ]
    for rule, kwargs in optional:
        if any(v is not None for k, v in kwargs.items() if k not in ("min_count", "cjk_scale")):
            rules.append(partial(rule, **kwargs))
    return rules
