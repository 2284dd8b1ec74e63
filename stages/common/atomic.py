"""One way to write a single file whole: every file a stage writes by itself (a shard, a shard's
arrays, a done marker, a JSON report) goes through `atomic_file`, so a reader, a rerun or DVC never
sees half of one. (A whole output folder: `io.atomic_dir`.)"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write (`.<name>.tmp-<pid>-<random>`, the name scheme of
    `io.atomic_dir`'s folders), renamed onto `path` when the block ends, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
