"""Text from bytes: plain text files and folders, word/POS-tagged corpora, and URLs.

Bytes go through `stages.readers.safe`: a file that is one document is decoded as UTF-8 when it
is, else in the encoding detected over the file; a file read a line at a time is decoded line by
line. Binary data, empty files, files over the size cap and symlinks that leave their folder are
dropped with their reason.
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import IO, Literal

from pydantic import Field

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing
from stages.readers.safe import chunks_of, decompressed, document, files_of, read_whole, text_lines


class TextSource(Source):
    type: Literal["text"]
    glob: str = "**/*"
    """Files to read when `path` is a folder (every file under it; unused when `path` is a file)."""
    split: Literal["file", "line"] = "file"
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


def lines_of(f: IO[bytes], name: str, cap: int | None, stats: Counter[str]) -> Iterator[tuple[int, str] | Drop]:
    """(number, text) of every line of a text stream as `str.splitlines` numbers them (a `\n` line
    holding other line breaks counts as several), each `\n` line decoded on its own."""
    count = 0
    for item in text_lines(chunks_of(f), name, cap, stats):
        if isinstance(item, Drop):
            count += 1  # a dropped line keeps its number, so the lines after it keep theirs
            yield item
            continue
        for piece in (item[1] + "\n").splitlines():
            count += 1
            yield count, piece


def text_docs(f: IO[bytes], rel: str, name: str, split: str, cap: int | None, stats: Counter[str]) -> Iterator[Item]:
    """The documents of one text file (or archive member): the whole file, or one per non-empty
    line (`rel:line`)."""
    if split == "file":
        data = read_whole(f, name, cap)
        text = data if isinstance(data, Drop) else document(data, name, stats)
        yield text if isinstance(text, Drop) else {"id": rel, "text": text}
        return
    for item in lines_of(f, name, cap, stats):
        if isinstance(item, Drop):
            yield item
        elif item[1].strip():
            yield {"id": f"{rel}:{item[0]}", "text": item[1].strip()}


def read_text(src: TextSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    path = existing(src, where)
    for file in files_of(path, src.glob):
        if isinstance(file, Drop):
            yield file
            continue
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if src.split == "file" and src.max_file_bytes is not None and file.stat().st_size > src.max_file_bytes:
            yield Drop("file_too_large", f"{file}: {file.stat().st_size} bytes > {src.max_file_bytes}")
            continue
        with open(file, "rb") as raw:
            yield from text_docs(decompressed(raw, file.name), rel, str(file), src.split, src.max_file_bytes, stats)


_TAG = re.compile(r"/[A-Za-z]+\b")


def read_tagged(src: TaggedSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    """A word/POS-tagged corpus (People's Daily style `词/n  词/v`): tags and the spaces between
    words removed, `lines_per_doc` paragraphs joined into a document."""
    path = existing(src, where)
    lines: list[str] = []
    for file in files_of(path, None):
        if isinstance(file, Drop):
            yield file
            return
        with open(file, "rb") as raw:
            for item in lines_of(decompressed(raw, file.name), str(file), src.max_file_bytes, stats):
                if isinstance(item, Drop):
                    yield item
                elif item[1].strip():
                    lines.append(item[1])
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
    text = document(data, src.path, stats)
    yield text if isinstance(text, Drop) else {"id": src.path, "text": text}
