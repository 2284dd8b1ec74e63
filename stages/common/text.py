"""Text utilities the data stages share: the CJK script ranges, surrogate and Unicode repair.

`collect` replaces lone surrogates as it reads, `clean` repairs every text with `repair`, and
`clean` and `dedup` tokenize CJK text (written without spaces) one character at a time with the
one definition of CJK characters below. Pure functions, no files.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from typing import Any

# Han (with its extensions and compatibility ideographs), kana and Hangul syllables, as code point
# ranges: the scripts whose characters the pipeline counts one token each.
CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
              (0x20000, 0x2FA1F))
CJK = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES)
"""The ranges as the inside of a regex character class: `[{CJK}]` is one CJK character."""
CJK_CHAR = re.compile(f"[{CJK}]")

SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 controls except \t and \n (\r is a line break, turned into \n first).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def fix_surrogates(text: str) -> str:
    """`text` with surrogates resolved: a pair written as two escapes (a UTF-16 leftover) becomes
    its character, a lone half becomes U+FFFD, so that Parquet and UTF-8 can hold the text."""
    if SURROGATE.search(text):
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def repair(text: str, form: str | None, fix_mojibake: bool) -> str:
    """`text` with surrogates resolved, encoding damage fixed (ftfy), one Unicode normal form
    (`form`, or none) and no control characters (tabs and newlines stay)."""
    text = fix_surrogates(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if fix_mojibake and _ftfy_may_change(text):
        import ftfy

        # Width and quote folding would rewrite correct Chinese punctuation (，“”): not damage.
        text = ftfy.fix_text(text, fix_character_width=False, uncurl_quotes=False, normalization=None,
                             explain=False)
    if form:
        text = unicodedata.normalize(form, text)
    return _CONTROL.sub("", text)


def _ftfy_may_change(text: str) -> bool:
    """False only where ftfy's `fix_text` (as `repair` calls it) returns `text` unchanged, found
    without its line-by-line pass (most of its time): no character one of its fixes rewrites, and
    no mojibake its detector could see: every pattern of ftfy's detector (`ftfy.badness.BADNESS_RE`)
    needs certain non-ASCII characters, and a text holding none of them cannot match it."""
    fixes, detector = _ftfy_checks()
    return bool(fixes.search(text)) or (not text.isascii() and detector(text))


@functools.cache
def _ftfy_checks() -> tuple[re.Pattern[str], Callable[[str], bool]]:
    """A pattern of the characters ftfy's fixes other than mojibake act on (HTML entities start
    with &; C1 and other control characters, ligatures, line and paragraph separators, carriage
    returns, surrogates), and a test whether a text could hold mojibake: for each alternative of
    ftfy's detector, the character classes it requires (plain characters and ranges, outside
    ASCII, at the alternative's top level); the text could match it when it holds a character
    of each. An alternative that requires no such class could match any text."""
    import re._constants as sre
    import re._parser

    from ftfy.badness import BADNESS_RE
    from ftfy.chardata import CONTROL_CHARS, LIGATURES

    acted_on = {"&", "\r", "\u2028", "\u2029", *map(chr, LIGATURES), *map(chr, CONTROL_CHARS),
                *map(chr, range(0x80, 0xA0))}
    fixes = re.compile("[" + "".join(map(re.escape, sorted(acted_on))) + "\ud800-\udfff]")

    def chars(op: Any, arg: Any) -> set[str] | None:
        if op == sre.LITERAL:
            return {chr(arg)}
        if op == sre.IN and all(o in (sre.LITERAL, sre.RANGE) for o, _ in arg):
            return {chr(c) for o, a in arg for c in ([a] if o == sre.LITERAL else range(a[0], a[1] + 1))}
        return None

    tree = re._parser.parse(BADNESS_RE.pattern, BADNESS_RE.flags)
    if BADNESS_RE.flags & re.IGNORECASE or len(tree.data) != 1 or tree.data[0][0] != sre.BRANCH:
        return fixes, lambda text: True  # not the shape read below: ask ftfy every time
    needs = []
    for branch in tree.data[0][1][1]:
        classes = [found for op, arg in branch.data
                   if (found := chars(op, arg)) is not None and all(c > "\x7f" for c in found)]
        needs.append([frozenset(c) for c in classes])
    candidates = re.compile("[" + "".join(map(re.escape, sorted(set().union(*(c for n in needs for c in n)))))
                            + "]")

    def detector(text: str) -> bool:
        present = set(candidates.findall(text))
        return any(all(c & present for c in classes) for classes in needs)

    return fixes, detector


def tidy(text: str) -> str:
    """Trailing spaces gone, at most one blank line in a row, no blank start or end."""
    # Each regex only where it has something to do: a plain scan for a substring costs far less.
    if " \n" in text or "\t\n" in text:
        text = re.sub(r"[ \t]+\n", "\n", text)
    if "\n\n\n" in text:
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
