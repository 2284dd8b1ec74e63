"""Reading a source's bytes safely: every reader that opens files or archive members goes through here.

- A file whose real path leaves the source's folder (a symlink out of it) is refused.
- A file, archive member or single line over the size cap (`collect.max_file_bytes`) is dropped
  and named, without being read whole.
- Binary data is told from text by its content (control bytes in its first 8 KiB), not by whether
  it happens to decode as UTF-8.
- Line-oriented data is decoded line by line (`LineDecoder`): a valid UTF-8 line is always read as
  UTF-8, whatever its neighbours hold; a line that is not is dropped as `invalid_utf8` in a UTF-8
  file, or decoded in the file's legacy encoding (detected over its non-UTF-8 lines only) in a
  legacy file. Whole-file charset detection is kept for a file that is one document.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import IO

from stages.common.io import Drop

log = logging.getLogger("llm_forge.collect")

HEAD = 8192
"""Bytes looked at to tell binary data from text."""
BINARY_SHARE = 0.01
"""Share of control bytes in the head above which data is binary: text written by people has
essentially none (git calls a file binary on a single NUL), binary formats about one byte in ten."""
CONTROL = bytes(sorted(set(range(32)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}))
"""C0 controls other than tab, line breaks, form feed and escape."""
CHUNK = 1 << 20
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Legacy encodings most text that is not UTF-8 comes in, most common first.
COMMON_ENCODINGS = ("cp1252", "gb18030", "big5", "shift_jis", "euc_jp", "euc_kr", "cp1251", "utf_16", "latin_1")


def files_of(path: Path, pattern: str | None) -> Iterator[Path | Drop]:
    """The files of a source: `path` itself, or the files under the folder `path` that `pattern`
    matches; a file whose real path leaves the source's folder is refused."""
    if path.is_dir():
        root = path.resolve()
        files = sorted(p for p in path.glob(pattern or "*") if p.is_file() or p.is_symlink())
    else:
        root, files = path.parent.resolve(), [path]
    for file in files:
        yield inside(file, root)


def inside(file: Path, root: Path) -> Path | Drop:
    """`file`, or why a source rooted at the real folder `root` may not read it: its real path
    leaves `root` (a symlink out of the source), or it is no regular file."""
    real = file.resolve()
    if not real.is_relative_to(root):
        return Drop("symlink_outside_source", f"{file} -> {real}")
    if not real.is_file():
        return Drop("unreadable_file", str(file))
    return file


def decompressed(f: IO[bytes], name: str) -> IO[bytes]:
    """`f` decompressed when `name` ends in .gz or .bz2."""
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=f)
    if name.endswith(".bz2"):
        return bz2.BZ2File(f)
    return f


def chunks_of(f: IO[bytes]) -> Iterator[bytes]:
    return iter(lambda: f.read(CHUNK), b"")


def read_whole(f: IO[bytes], name: str, cap: int | None) -> bytes | Drop:
    """All bytes of a stream, or `file_too_large` once it passes `cap` (never holding more)."""
    try:
        return read_chunks(chunks_of(f), name, cap)
    except (OSError, EOFError) as err:
        return Drop("unreadable_file", f"{name}: {err}")


def read_chunks(chunks: Iterable[bytes], name: str, cap: int | None) -> bytes | Drop:
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if cap is not None and size > cap:
            return Drop("file_too_large", f"{name}: over {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


def load(file: Path, cap: int | None) -> bytes | Drop:
    """A file's bytes (decompressed .gz/.bz2), or why not."""
    if cap is not None and file.stat().st_size > cap:
        return Drop("file_too_large", f"{file}: {file.stat().st_size} bytes > {cap}")
    with open(file, "rb") as raw:
        return read_whole(decompressed(raw, file.name), str(file), cap)


def bom_codec(data: bytes) -> str | None:
    """The UTF-16/32 codec a byte-order mark announces."""
    return next((codec for bom, codec in BOMS if data.startswith(bom)), None)


def looks_binary(data: bytes) -> bool:
    head = data[:HEAD]
    if not head or bom_codec(head):
        return False
    return len(head) - len(head.translate(None, CONTROL)) > BINARY_SHARE * len(head)


def detect(data: bytes) -> tuple[str, str] | None:
    """(text, encoding) in the encoding charset-normalizer finds for `data`, or None."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        return None
    # Short texts fit many code pages equally well; among the least chaotic, prefer the common.
    least = min(m.chaos for m in matches)
    tied = [m for m in matches if m.chaos <= least + 0.01]
    best = next((m for enc in COMMON_ENCODINGS for m in tied if m.encoding == enc), tied[0])
    return str(best), best.encoding


def document(data: bytes, name: str, stats: Counter[str]) -> str | Drop:
    """A whole file as one text: UTF-8 when it is, else the encoding detected over the file."""
    if not data.strip():
        return Drop("empty_file", name)
    if looks_binary(data):
        return Drop("binary_file", name)
    codec = bom_codec(data)
    if codec:
        return data.decode(codec, errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    found = detect(data)
    if found is None:
        return Drop("unknown_encoding", name)
    stats[f"decoded_{found[1]}"] += 1
    log.info("%s is not UTF-8: decoded as %s", name, found[1])
    return found[0]


def split_lines(chunks: Iterable[bytes], cap: int | None) -> Iterator[bytes | None]:
    """The lines of a byte stream (without their `\\n`); None for a line longer than `cap`, which
    is skipped without being held."""
    rest, skipping = b"", False
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield None if skipping or (cap is not None and len(part) > cap) else part
            skipping = False
        if skipping or (cap is not None and len(rest) > cap):
            rest, skipping = b"", True
    if skipping or rest:
        yield None if skipping else rest


class LineDecoder:
    """Decodes the lines of one file, each on its own. A valid UTF-8 line is always read as UTF-8.
    A line that is not: in a UTF-8 file (one whose first non-ASCII lines include a valid one) it
    is a broken record and is dropped as `invalid_utf8`; in a file written in a legacy encoding
    (none of its first non-ASCII lines is UTF-8) it is decoded in the encoding detected over those
    non-UTF-8 lines, or dropped when it does not decode in it either."""

    def __init__(self, head_lines: list[bytes], stats: Counter[str]) -> None:
        self.stats = stats
        self.legacy: str | None = None
        self.decided = False
        self.decide(head_lines)

    def decide(self, lines: list[bytes]) -> None:
        bad = []
        for raw in lines:
            if raw.isascii():
                continue
            try:
                raw.decode("utf-8")
                self.decided = True  # a UTF-8 file
                return
            except UnicodeDecodeError:
                bad.append(raw)
        if bad:
            found = detect(b"\n".join(bad))
            self.legacy, self.decided = (found[1] if found else None), True

    def __call__(self, raw: bytes, where: str) -> str | Drop:
        if not self.decided and not raw.isascii():
            self.decide([raw])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if self.legacy:
            try:
                text = raw.decode(self.legacy)
                self.stats[f"lines_decoded_{self.legacy}"] += 1
                return text
            except (UnicodeDecodeError, LookupError):
                pass
        return Drop("invalid_utf8", where)


def text_lines(chunks: Iterable[bytes], name: str, cap: int | None,
               stats: Counter[str]) -> Iterator[tuple[int, str] | Drop]:
    """(line number, text) of each line of line-oriented data, each line decoded on its own; a
    Drop for the whole data when it is binary, for a line over `cap` or that no encoding fits."""
    chunks = iter(chunks)
    head = b""
    try:
        while len(head) < HEAD and (chunk := next(chunks, b"")):
            head += chunk
        if looks_binary(head):
            yield Drop("binary_file", name)
            return
        codec = bom_codec(head)
        if codec:  # UTF-16/32 lines cannot be split on b"\n": decode the whole, as the BOM says
            data = read_chunks(chain([head], chunks), name, cap)
            if isinstance(data, Drop):
                yield data
                return
            yield from enumerate(data.decode(codec, errors="replace").split("\n"), 1)
            return
        decoder = LineDecoder(head.split(b"\n")[:-1], stats)
        for n, raw in enumerate(split_lines(chain([head], chunks), cap), 1):
            if raw is None:
                yield Drop("record_too_large", f"{name}:{n}: over {cap} bytes")
                continue
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            text = decoder(raw, f"{name}:{n}")
            yield text if isinstance(text, Drop) else (n, text)
    except (OSError, EOFError) as err:
        yield Drop("unreadable_file", f"{name}: {err}")

