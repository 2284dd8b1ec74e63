"""PII and secret patterns: `clean` redacts them, `validate` checks none is left.

One table, so the check can never drift from the redaction. Each pattern is a plain regular
expression (Great Expectations evaluates the same text with pandas' regex engine), ordered so
that the more specific secrets are replaced before the generic ones.
"""

from __future__ import annotations

import re

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


def redact(text: str) -> tuple[str, dict[str, int]]:
    """`text` with every match replaced by its placeholder, and the count per pattern."""
    counts: dict[str, int] = {}
    for name, pattern in PATTERNS.items():
        text, n = pattern.subn(PLACEHOLDERS[name], text)
        if n:
            counts[name] = n
    return text, counts
