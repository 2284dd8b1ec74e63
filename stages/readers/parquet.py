"""Parquet files of documents: one file, or every `*.parquet` under a folder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing, text_record


class ParquetSource(Source):
    type: Literal["parquet"]
    text_field: str
    """Column holding the document text."""
    id_field: str | None
    """Column holding the source's id; rows without it get a content id (null: always)."""


def read_parquet(src: ParquetSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path = existing(src, where)
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:
            yield Drop("unreadable_file", f"{file}: {err}")
            continue
        if src.text_field not in table.column_names:
            raise StageError(f"{where}: {file} has no column '{src.text_field}' (columns: {table.column_names})")
        for i, row in enumerate(table.to_pylist()):
            yield text_record(row, src.text_field, src.id_field, f"{file}#{i}")
