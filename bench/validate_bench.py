"""validate's Great Expectations suites over every shard of `data/dedup/`, in each result format:
the CPU seconds Great Expectations spends per run of all shards.

validate asks for BASIC (a shard's counts and its first unexpected values, all that its result
keeps); SUMMARY, the library's default, also counts every unexpected value and lists their row
indices. Each format runs `--repeats` times over all shards in this process, after one warm-up run
of the first shards (which builds the suites), timed with `time.process_time`.

    python -m bench.validate_bench [--params params.yaml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FORMATS = ("SUMMARY", "BASIC")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from stages.common.config import Paths, load_section, read_yaml
    from stages.common.io import KINDS
    from stages.common.sections import CleanLimits
    from stages.common.shards import read_shard, shard_paths
    from stages.validate import Check, ValidateConfig, _definition, text_columns

    params = read_yaml(args.params)
    clean = load_section(CleanLimits, "clean", params)
    check = Check(load_section(ValidateConfig, "validate", params), clean.max_chars)
    paths = load_section(Paths, "paths", params)
    frames = [(kind, text_columns(kind, read_shard(p).to_pylist()))
              for kind in KINDS for p in shard_paths(paths.dedup, kind)]
    if not frames:
        raise SystemExit(f"no shards under {paths.dedup}: run the pipeline up to dedup first")

    def run_all(fmt: str) -> float:
        started = time.process_time()
        for kind, df in frames:
            _definition(kind, check, tuple(df.columns)).run(batch_parameters={"dataframe": df}, result_format=fmt)
        return time.process_time() - started

    for kind, df in frames[:len(KINDS)]:  # warm-up: the suites and the library's caches
        _definition(kind, check, tuple(df.columns)).run(batch_parameters={"dataframe": df})
    out = {"shards": len(frames), "rows": sum(len(df) for _, df in frames)}
    for fmt in FORMATS:
        out[fmt] = [round(run_all(fmt), 2) for _ in range(args.repeats)]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
