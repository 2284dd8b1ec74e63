"""JSON lines (or one JSON array) of documents; `read_lines` also serves the chat readers."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from stages.common.io import Drop
from stages.readers.base import Item, Source, existing, text_record
from stages.readers.files import decode, open_bytes


class JsonlSource(Source):
    type: Literal["jsonl"]
    text_field: str
    """Field holding the document text."""
    id_field: str | None
    """Field holding the source's id; records without it get a content id (null: always)."""


def read_lines(src: Source, where: str, stats: Counter[str]) -> Iterator[tuple[str, Any] | Drop]:
    """(`file:line`, parsed JSON value) for each non-blank line of a JSONL file, or for each
    element of a JSON array file (`file:index`)."""
    path = existing(src, where)
    text = decode(open_bytes(path), str(path), stats)
    if text is None:
        yield Drop("binary_file", str(path))
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            yield Drop("malformed_json", f"{path}: {err}")
            return
        for i, obj in enumerate(items, 1):
            yield f"{src.path}:{i}", obj
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{src.path}:{lineno}", json.loads(line)
        except json.JSONDecodeError:
            yield Drop("malformed_json", f"{path}:{lineno}")


def read_jsonl(src: JsonlSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        yield item if isinstance(item, Drop) else text_record(item[1], src.text_field, src.id_field, item[0])
