"""Parquet files of documents: one file, or every `*.parquet` under a folder.

Files are read a batch of rows at a time; a file that is a symlink out of the source's folder is
refused, and a text over the size cap is dropped as `record_too_large`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing, text_record
from stages.readers.safe import files_of


class ParquetSource(Source):
    type: Literal["parquet"]
    text_field: str = "text"
    """Column holding the document text."""
    id_field: str | None = None
    """Column holding the source's id; rows without it get a content id (null: always)."""


def read_parquet(src: ParquetSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path = existing(src, where)
    cap = src.max_file_bytes
    for file in files_of(path, "**/*.parquet"):
        if isinstance(file, Drop):
            yield file
            continue
        try:
            pf = pq.ParquetFile(file)
        except Exception as err:
            yield Drop("unreadable_file", f"{file}: {err}")
            continue
        if src.text_field not in pf.schema_arrow.names:
            raise StageError(f"{where}: {file} has no column '{src.text_field}' (columns: {pf.schema_arrow.names})")
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                text = row.get(src.text_field)
                if cap is not None and isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > cap:
                    yield Drop("record_too_large", f"{file}#{i}: over {cap} bytes")
                else:
                    yield text_record(row, src.text_field, src.id_field, f"{file}#{i}")
                i += 1
