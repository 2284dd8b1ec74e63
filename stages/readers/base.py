"""What every source config has, and the helpers readers share to pull fields out of rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common.config import StageConfig, StageError, resolve_path
from stages.common.io import Drop


class Source(StageConfig):
    """A source needs only what identifies it (`name`, `type`, `path`, and what its type cannot do
    without); every other knob has its natural default here, once, and params.yaml names it only
    where it differs."""

    name: str
    """Short name: the `source` column of every record, and how clean picks its markup rules."""
    path: str
    """File, folder, URL, dataset name; `pkg://package/rel` points inside an installed package."""
    max_docs: int | None = Field(default=None, ge=1)
    """Take at most this many records from the source (null: all)."""
    max_file_bytes: int | None = Field(default=None, ge=1)
    """Largest file, archive member or line this source may read (null: `collect.max_file_bytes`)."""


Item = dict[str, Any] | Drop
"""What a reader yields: a record, or why an item of the source could not become one."""


def existing(src: Source, where: str) -> Path:
    """The source's path on this machine; a StageError naming `where` when it is missing."""
    try:
        path = resolve_path(src.path)
    except FileNotFoundError as err:
        raise StageError(f"{where}: {err}") from None
    if not path.exists():
        raise StageError(f"{where}: path {path} does not exist")
    return path


def field_text(obj: Any, field: str, where: str) -> str | Drop:
    """The string in `obj[field]`, or why there is none."""
    if not isinstance(obj, dict):
        return Drop("not_an_object", where)
    value = obj.get(field)
    if value is None:
        return Drop(f"missing_{field}", where)
    if not isinstance(value, str):
        return Drop(f"wrong_type_{field}", where)
    return value


def native_id(obj: dict[str, Any], field: str | None) -> str | None:
    """The source's own id of a row, when it has a usable one."""
    if field and obj.get(field) is not None and not isinstance(obj.get(field), (dict, list)):
        return str(obj[field])
    return None


def text_record(row: Any, text_field: str, id_field: str | None, where: str) -> Item:
    """A corpus record from a row with a text field (JSONL, Parquet, datasets)."""
    text = field_text(row, text_field, where)
    return text if isinstance(text, Drop) else {"id": native_id(row, id_field), "text": text}
