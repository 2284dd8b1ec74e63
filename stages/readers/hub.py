"""Hugging Face `datasets`: a local `save_to_disk` folder, or a dataset name on the hub.

The same source type feeds any kind: corpus rows by `text_field`, instruction rows by their
Alpaca columns, preference rows by `prompt`, `chosen`, `rejected`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from stages.common.config import StageError
from stages.common.io import resolve_path
from stages.readers.base import Item, Source, text_record
from stages.readers.chat import instruction, preference


class HFSource(Source):
    type: Literal["hf"]
    split: str
    """Split of the dataset to read (a DatasetDict folder or a hub dataset)."""
    text_field: str
    """Column holding the document text (corpus)."""
    id_field: str | None
    """Column holding the source's id; rows without it get a content id (null: always)."""


def rows(src: HFSource, where: str) -> Iterator[tuple[str, Any]]:
    """(`path#row`, row) for every row of the dataset."""
    import datasets

    local = resolve_path(src.path)
    try:
        if local.exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as err:
        raise StageError(f"{where}: cannot load dataset '{src.path}': {err}") from None
    for i, row in enumerate(ds):
        yield f"{src.path}#{i}", row


def read_corpus(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for at, row in rows(src, where):
        yield text_record(row, src.text_field, src.id_field, at)


def read_instructions(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for at, row in rows(src, where):
        yield instruction(row, at, None)


def read_preferences(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for at, row in rows(src, where):
        yield preference(row, at)
