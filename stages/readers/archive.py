"""Archives (zip, tar, tar.gz, tar.bz2, tar.xz) whose members are read like the files of a folder.

Members are read into memory, never extracted to disk, each under the size cap. A member that
could land outside the archive's root when extracted (an absolute path, a `..` part: zip slip) or
that is a link (symlink or hard link) or a device is refused as `unsafe_archive_member`, counted,
and never read; the other members matching `glob` are read as text (like a `text` source) or as
JSON lines of documents (like a `jsonl` source).
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path
from typing import IO, Literal

from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing, text_record
from stages.readers.files import text_docs
from stages.readers.jsonl import json_values
from stages.readers.safe import chunks_of, decompressed, files_of


class ArchiveSource(Source):
    type: Literal["archive"]
    glob: str = "**/*"
    """Members to read, matched like the files of a folder (`**/*.txt`, `data/*.jsonl`; every member by default)."""
    format: Literal["text", "jsonl"]
    """Members are plain text (see `split`) or JSON lines of documents (see `text_field`)."""
    split: Literal["file", "line"] = "file"
    """Text members: one document per member, or one per non-empty line."""
    text_field: str = "text"
    """JSONL members: field holding the document text."""
    id_field: str | None = None
    """JSONL members: field holding the source's id (null: content ids)."""


Member = tuple[str, int, Callable[[], IO[bytes]]]
"""(name, declared size, opener) of a regular-file member."""


def unsafe(name: str) -> str | None:
    """Why a member's path could leave the archive's root when extracted, or None."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' leaves the archive"
    return None


def zip_members(zf: zipfile.ZipFile, where: str) -> Iterator[Member | Drop]:
    for info in zf.infolist():
        if info.is_dir():
            continue
        why = unsafe(info.filename) or ("a symlink" if stat.S_ISLNK(info.external_attr >> 16) else None)
        if why:
            yield Drop("unsafe_archive_member", f"{where}!{info.filename}: {why}")
        else:
            yield info.filename, info.file_size, partial(zf.open, info)


def tar_members(tf: tarfile.TarFile, where: str) -> Iterator[Member | Drop]:
    for info in tf:
        if info.isdir():
            continue
        why = unsafe(info.name) or ("a symlink" if info.issym() else "a hard link" if info.islnk()
                                     else None if info.isfile() else "not a regular file")
        if why:
            yield Drop("unsafe_archive_member", f"{where}!{info.name}: {why}")
        else:
            yield info.name, info.size, partial(tf.extractfile, info)


def matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether a member's path parts match a glob's parts (`**`: any number of folders)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and matches(parts[1:], pattern[1:])


def member_docs(src: ArchiveSource, f: IO[bytes], rel: str, name: str, stats: Counter[str]) -> Iterator[Item]:
    f = decompressed(f, rel)
    if src.format == "text":
        yield from text_docs(f, rel, name, src.split, src.max_file_bytes, stats)
        return
    for item in json_values(chunks_of(f), name, src.max_file_bytes, stats):
        yield item if isinstance(item, Drop) else text_record(item[1], src.text_field, src.id_field, item[0])


def read_archive(src: ArchiveSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    path = existing(src, where)
    if path.is_dir():
        raise StageError(f"{where}: {path} is a folder, not an archive")
    refused = next((f for f in files_of(path, None) if isinstance(f, Drop)), None)
    if refused is not None:
        yield refused
        return
    pattern = [p for p in src.glob.split("/") if p not in ("", ".")]
    cap = src.max_file_bytes
    try:
        if zipfile.is_zipfile(path):
            archive, members = zipfile.ZipFile(path), zip_members
        elif tarfile.is_tarfile(path):
            archive, members = tarfile.open(path, "r:*"), tar_members
        else:
            raise StageError(f"{where}: {path} is not a zip or tar archive")
        with archive:
            for member in members(archive, str(path)):  # type: ignore[operator]
                if isinstance(member, Drop):
                    yield member
                    continue
                name, size, opener = member
                rel = "/".join(p for p in Path(name).as_posix().split("/") if p not in ("", "."))
                if not matches(rel.split("/"), pattern):
                    continue
                if cap is not None and size > cap:
                    yield Drop("file_too_large", f"{path}!{rel}: {size} bytes > {cap}")
                    continue
                with opener() as f:
                    yield from member_docs(src, f, rel, f"{path}!{rel}", stats)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as err:
        yield Drop("unreadable_archive", f"{path}: {err}")
