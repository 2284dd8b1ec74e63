"""PII and secret patterns: `clean` redacts them, `validate` checks none is left.

One table, so the check can never drift from the redaction. Each pattern is a plain regular
expression (Great Expectations evaluates the same text with pandas' regex engine), ordered so
that the more specific secrets are replaced before the generic ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable

PATTERNS: dict[str, re.Pattern[str]] = {
    "private_key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    "aws_key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "github_token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b"),
    "slack_token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    "api_key": re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{20,}\b"),
    "bearer_token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{20,}=*"),
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ipv4": re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"),
    "ipv6": re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"),
    # +CC numbers, (NNN) NNN-NNNN, NNN-NNN-NNNN, and national numbers with a 0 trunk prefix;
    # bare digit runs and lists of years ("1998 2001 2003") are left alone.
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
        r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}|0\d{1,4}[ -]\d{3,4}[ -]\d{3,4})(?!\w)"
    ),
}

PLACEHOLDERS = {name: f"<{name.upper()}>" for name in PATTERNS}

# The patterns open with \b or a lookbehind, so the regex engine tries each of them at every
# position of a text, and the ten scans were a large part of clean's time. Each gate below is a
# necessary condition: a piece that every match of its pattern contains, found by a fast scan for
# a literal character (the regex engine's quickest search). Where a gate finds nothing the
# pattern cannot match, so `redact` skips it: the same text and counts as running every pattern.
_PHONE_PIECES = tuple(re.compile(p) for p in (
    r"\+\d",  # +CC numbers
    r"\(\d{3}\)",  # (NNN) NNN-NNNN
    r"\.\d{3}[.-]", r"-\d{3}[.-]",  # NNN-NNN-NNNN, NNN.NNN.NNNN
    r"0\d{1,4}[ -]\d",  # national numbers with a 0 trunk prefix
))
GATES: dict[str, Callable[[str], object]] = {
    "private_key": re.compile("-----BEGIN ").search,
    "aws_key": re.compile("AKIA|ASIA").search,
    "github_token": re.compile("gh[pousr]_|github_pat_").search,
    "slack_token": re.compile("xox[abposr]-").search,
    "api_key": re.compile("k-").search,
    # Case-insensitive: no letter of "bearer" has a case variant outside ASCII, so lowercasing finds every match.
    "bearer_token": lambda text: "bearer" in text.lower(),
    "email": re.compile("@").search,
    "ipv4": re.compile(r"\.\d{1,3}\.\d{1,3}\.\d").search,
    "ipv6": re.compile(r":[0-9A-Fa-f]{1,4}:").search,
    "phone": lambda text: any(piece.search(text) for piece in _PHONE_PIECES),
}


def redact(text: str) -> tuple[str, dict[str, int]]:
    """`text` with every match replaced by its placeholder, and the count per pattern."""
    counts: dict[str, int] = {}
    for name, pattern in PATTERNS.items():
        if not GATES[name](text):
            continue
        text, n = pattern.subn(PLACEHOLDERS[name], text)
        if n:
            counts[name] = n
    return text, counts
