"""Apply a profile: params.yaml with a profile's values merged in, written as a params file.

A profile (`profiles/<name>.yaml`) holds only the values that differ from `params.yaml`; a key
that `params.yaml` lacks is an error, so a profile cannot drift from the stages' configs.

    python -m stages.common.profile profiles/tiny.yaml [--base params.yaml] [--out params.yaml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from stages.common.config import ConfigError, overlay, read_yaml


def apply(profile: Path, base: Path = Path("params.yaml"), out: Path = Path("params.yaml")) -> dict:
    merged = overlay(read_yaml(base), read_yaml(profile))
    header = f"# params.yaml with {profile} applied (python -m stages.common.profile {profile})\n"
    Path(out).write_text(header + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.common.profile", description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--base", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    try:
        apply(args.profile, args.base, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.profile} over {args.base}); `git checkout {args.out}` undoes it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
