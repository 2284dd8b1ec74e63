"""JSON lines (or one JSON array) of documents; `read_lines` also serves the chat readers.

JSON lines are read as a stream and decoded line by line (`stages.readers.safe`): a line that is
not UTF-8 is decoded or dropped on its own and never changes how the other lines are read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any, Literal

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing, text_record
from stages.readers.safe import HEAD, chunks_of, decompressed, document, files_of, read_chunks, text_lines


class JsonlSource(Source):
    type: Literal["jsonl"]
    text_field: str = "text"
    """Field holding the document text."""
    id_field: str | None = None
    """Field holding the source's id; records without it get a content id (null: always)."""


def json_values(chunks: Iterable[bytes], name: str, cap: int | None,
                stats: Counter[str]) -> Iterator[tuple[str, Any] | Drop]:
    """(`name:line`, parsed JSON value) for each non-blank line of JSON lines, or for each element
    of a JSON array (`name:index`, read whole under `cap`)."""
    chunks = iter(chunks)
    head = b""
    while len(head) < HEAD and (chunk := next(chunks, b"")):
        head += chunk
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        data = read_chunks(chain([head], chunks), name, cap)
        text = data if isinstance(data, Drop) else document(data, name, stats)
        if isinstance(text, Drop):
            yield text
            return
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            yield Drop("malformed_json", f"{name}: {err}")
            return
        for i, obj in enumerate(items, 1):
            yield f"{name}:{i}", obj
        return
    for item in text_lines(chain([head], chunks), name, cap, stats):
        if isinstance(item, Drop):
            yield item
        elif item[1].strip():
            try:
                yield f"{name}:{item[0]}", json.loads(item[1])
            except json.JSONDecodeError:
                yield Drop("malformed_json", f"{name}:{item[0]}")


def read_lines(src: Source, where: str, stats: Counter[str]) -> Iterator[tuple[str, Any] | Drop]:
    """`json_values` of the source's file (plain, .gz or .bz2)."""
    path = existing(src, where)
    if path.is_dir():
        raise StageError(f"{where}: {path} is a folder: this source type reads one file")
    for file in files_of(path, None):
        if isinstance(file, Drop):
            yield file
            continue
        try:
            with open(file, "rb") as raw:
                yield from json_values(chunks_of(decompressed(raw, file.name)), str(file), src.max_file_bytes, stats)
        except (OSError, EOFError) as err:  # a corrupt .gz/.bz2
            yield Drop("unreadable_file", f"{file}: {err}")


def read_jsonl(src: JsonlSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        yield item if isinstance(item, Drop) else text_record(item[1], src.text_field, src.id_field, item[0])
