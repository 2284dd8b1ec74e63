"""Text from bytes: plain text files and folders, word/POS-tagged corpora, and URLs.

Bytes are decoded as UTF-8 when they are, else in the encoding charset-normalizer finds; binary
data, empty files and symlinks that leave their folder are dropped with their reason.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing

log = logging.getLogger("llm_forge.collect")

# Legacy encodings most text that is not UTF-8 comes in, most common first.
COMMON_ENCODINGS = ("cp1252", "gb18030", "big5", "shift_jis", "euc_jp", "euc_kr", "cp1251", "utf_16", "latin_1")


class TextSource(Source):
    type: Literal["text"]
    glob: str | None
    """Files to read when `path` is a folder (null when it is one file)."""
    split: Literal["file", "line"]
    """One document per file, or one per non-empty line (corpora stored one article a line)."""


class TaggedSource(Source):
    type: Literal["tagged"]
    lines_per_doc: int = Field(ge=1)
    """Consecutive paragraphs joined into one document."""


class UrlSource(Source):
    type: Literal["url"]
    max_bytes: int = Field(ge=1)
    """Refuse a download larger than this."""
    timeout_s: float = Field(gt=0)
    """Seconds to wait for the server."""


def decode(data: bytes, where: str, stats: Counter[str]) -> str | None:
    """Bytes to text: UTF-8 when it is, else the encoding charset-normalizer finds; None for
    binary data."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192] and data[:8192].count(b"\x00") > len(data[:8192]) // 100:
        return None
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        return None
    # Short texts fit many code pages equally well; among the least chaotic, prefer the common.
    least = min(m.chaos for m in matches)
    tied = [m for m in matches if m.chaos <= least + 0.01]
    best = next((m for enc in COMMON_ENCODINGS for m in tied if m.encoding == enc), tied[0])
    stats[f"decoded_{best.encoding}"] += 1
    log.info("%s is not UTF-8: decoded as %s", where, best.encoding)
    return str(best)


def open_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when it is .bz2 or .gz."""
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        return bz2.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    return raw


def read_text(src: TextSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    path = existing(src, where)
    if path.is_dir():
        if src.glob is None:
            raise StageError(f"{where}: {path} is a folder: set `glob` to the files to read")
        root = path.resolve()
        files = sorted(p for p in path.glob(src.glob) if p.is_file() or p.is_symlink())
    else:
        root, files = path.parent.resolve(), [path]
    for file in files:
        rel = file.relative_to(path) if path.is_dir() else Path(file.name)
        real = file.resolve()
        if not real.is_relative_to(root):
            yield Drop("symlink_outside_source", f"{file} -> {real}")
            continue
        if not real.is_file():
            yield Drop("unreadable_file", str(file))
            continue
        data = open_bytes(real)
        if not data.strip():
            yield Drop("empty_file", str(file))
            continue
        text = decode(data, str(file), stats)
        if text is None:
            yield Drop("binary_file", str(file))
            continue
        if src.split == "file":
            yield {"id": rel.as_posix(), "text": text}
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield {"id": f"{rel.as_posix()}:{lineno}", "text": line.strip()}


_TAG = re.compile(r"/[A-Za-z]+\b")


def read_tagged(src: TaggedSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    """A word/POS-tagged corpus (People's Daily style `词/n  词/v`): tags and the spaces between
    words removed, `lines_per_doc` paragraphs joined into a document."""
    path = existing(src, where)
    text = decode(open_bytes(path), str(path), stats)
    if text is None:
        yield Drop("binary_file", str(path))
        return
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for start in range(0, len(lines), src.lines_per_doc):
        paras = ["".join(_TAG.sub("", tok) for tok in ln.split()) for ln in lines[start : start + src.lines_per_doc]]
        yield {"id": f"{path.name}:{start + 1}", "text": "\n".join(paras)}


def read_url(src: UrlSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    if not re.match(r"https?://", src.path):
        raise StageError(f"{where}: '{src.path}' is not an http(s) URL")
    try:
        with urllib.request.urlopen(src.path, timeout=src.timeout_s) as resp:
            data = resp.read(src.max_bytes + 1)
    except OSError as err:
        raise StageError(f"{where}: cannot download {src.path}: {err}") from None
    if len(data) > src.max_bytes:
        yield Drop("download_too_large", f"{src.path} > {src.max_bytes} bytes")
        return
    text = decode(data, src.path, stats)
    if text is None or not text.strip():
        yield Drop("binary_file" if text is None else "empty_file", src.path)
        return
    yield {"id": src.path, "text": text}
