"""Hugging Face `datasets`: a local `save_to_disk` folder, or a dataset name on the hub.

The same source type feeds any kind: corpus rows by `text_field`, instruction rows by their
Alpaca columns, preference rows by `prompt`, `chosen`, `rejected`.

Read like files: a local folder's data files go through the symlink rule of `stages.readers.safe`
(a file whose real path leaves the folder is refused and counted), each one is memory-mapped and
read a row at a time, and a row whose text is over the size cap (`max_file_bytes`) is dropped as
`record_too_large`, as a Parquet row is. A hub dataset is streamed, so the cap holds for its rows
too and nothing is downloaded whole first. A dataset that cannot be read at all (not a
`save_to_disk` folder, a split it lacks, a hub name that cannot be reached) stops the stage with
one sentence naming the source and the dataset; a data file that cannot be read is dropped as
`unreadable_file` and the others are read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from stages.common.config import StageError, resolve_path
from stages.common.io import Drop
from stages.readers.base import Item, Source, text_record
from stages.readers.chat import instruction, preference
from stages.readers.safe import inside

DICT_FILE, STATE_FILE = "dataset_dict.json", "state.json"  # what `save_to_disk` writes


class HFSource(Source):
    type: Literal["hf"]
    split: str = "train"
    """Split of the dataset to read (a DatasetDict folder or a hub dataset)."""
    text_field: str = "text"
    """Column holding the document text (corpus)."""
    id_field: str | None = None
    """Column holding the source's id; rows without it get a content id (null: always)."""


def cannot(where: str, src: HFSource, why: Any) -> StageError:
    first = (str(why).strip().splitlines() or [type(why).__name__])[0][:300]
    return StageError(f"{where}: cannot read the dataset '{src.path}' (split {src.split}): {first}")


def rows(src: HFSource, where: str) -> Iterator[tuple[str, Any] | Drop]:
    """(`path#row`, row) for every row of the dataset, or a Drop for a row or file it refuses."""
    local = resolve_path(src.path)
    found = local_rows(src, local, where) if local.exists() else hub_rows(src, where)
    for item in found:
        if isinstance(item, Drop):
            yield item
        else:
            yield capped(item, src.max_file_bytes)


def local_rows(src: HFSource, folder: Path, where: str) -> Iterator[tuple[str, Any] | Drop]:
    """The rows of a `save_to_disk` folder (a Dataset, or the split `src.split` of a DatasetDict)."""
    import datasets

    root = folder.resolve()
    if not folder.is_dir():
        raise cannot(where, src, f"{folder} is a file, not a `save_to_disk` folder")
    if (folder / DICT_FILE).exists():
        splits = json.loads(checked(folder / DICT_FILE, root, where, src).read_text()).get("splits", [])
        if src.split not in splits:
            raise cannot(where, src, f"it has no split '{src.split}' (splits: {', '.join(splits)})")
        folder = folder / src.split
    if not (folder / STATE_FILE).exists():
        raise cannot(where, src, f"{folder} holds no {STATE_FILE}: not a `save_to_disk` folder")
    try:
        files = [f["filename"] for f in json.loads(checked(folder / STATE_FILE, root, where, src).read_text())
                 ["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise cannot(where, src, f"{folder / STATE_FILE} is not what `save_to_disk` writes ({err})") from None
    n = 0
    for name in files:
        file = inside(folder / name, root)
        if isinstance(file, Drop):
            yield file
            continue
        try:
            part = datasets.Dataset.from_file(str(file))
        except Exception as err:
            yield Drop("unreadable_file", f"{file}: {(str(err).splitlines() or [type(err).__name__])[0][:200]}")
            continue
        for row in part:
            yield f"{src.path}#{n}", row
            n += 1


def checked(file: Path, root: Path, where: str, src: HFSource) -> Path:
    """A file the folder's layout depends on: without it the dataset cannot be read at all."""
    found = inside(file, root)
    if isinstance(found, Drop):
        raise cannot(where, src, f"{found.detail} ({found.reason})")
    return found


def hub_rows(src: HFSource, where: str) -> Iterator[tuple[str, Any]]:
    """The rows of a hub dataset, streamed."""
    import datasets

    try:
        stream: Iterable[Any] = datasets.load_dataset(src.path, split=src.split, streaming=True)
        for i, row in enumerate(stream):
            yield f"{src.path}#{i}", row
    except Exception as err:
        raise cannot(where, src, err) from None


def size(value: Any) -> int:
    """Bytes of the text a row holds (strings, in lists and mappings too)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(size(v) for v in value)
    return 0


def capped(item: tuple[str, Any], cap: int | None) -> tuple[str, Any] | Drop:
    at, row = item
    if cap is not None and size(row) > cap:
        return Drop("record_too_large", f"{at}: over {cap} bytes")
    return item


def read_corpus(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in rows(src, where):
        yield item if isinstance(item, Drop) else text_record(item[1], src.text_field, src.id_field, item[0])


def read_instructions(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in rows(src, where):
        yield item if isinstance(item, Drop) else instruction(item[1], item[0], None)


def read_preferences(src: HFSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in rows(src, where):
        yield item if isinstance(item, Drop) else preference(item[1], item[0])
