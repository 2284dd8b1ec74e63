"""Text utilities the data stages share: the CJK script ranges, surrogate and Unicode repair.

`collect` replaces lone surrogates as it reads, `clean` repairs every text with `repair`, and
`clean` and `dedup` tokenize CJK text (written without spaces) one character at a time with the
one definition of CJK characters below. Pure functions, no files.
"""

from __future__ import annotations

import re
import unicodedata

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
    if fix_mojibake:
        import ftfy

        # Width and quote folding would rewrite correct Chinese punctuation (，“”): not damage.
        text = ftfy.fix_text(text, fix_character_width=False, uncurl_quotes=False, normalization=None,
                             explain=False)
    if form:
        text = unicodedata.normalize(form, text)
    return _CONTROL.sub("", text)


def tidy(text: str) -> str:
    """Trailing spaces gone, at most one blank line in a row, no blank start or end."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
