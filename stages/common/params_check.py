"""The whole params file checked at once, before any stage runs (the flow calls it, and so can a
user): every section a `dvc.yaml` stage reads, loaded into its typed config, and the source paths
`collect` will open; every problem is named in one message.

    python -m stages.common.params_check [--params params.yaml]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stages.common.config import (
    DVC_FILE,
    HOW,
    PARAMS_FILE,
    ConfigError,
    Paths,
    config_class,
    key_problems,
    read_yaml,
    resolve_path,
)
from stages.common.training import TrainConfig

# Flows that read a params section of their own (`flows/<name>.py`, class `<Name>Config`): a
# flow is not a `dvc.yaml` stage, so the graph does not name it.
FLOWS = ("retrain",)


def stage_sections(dvc_file: Path = DVC_FILE) -> dict[str, type[BaseModel]]:
    """Every params section a `dvc.yaml` stage reads -> its typed config: the stage's own section
    (module `stages.<name>`, class `<Name>Config`), the sections its module `READS`, and the
    shared `train` section of the training stages; then the flows' sections and the `HOW` ones."""
    stages = (yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8")) or {}).get("stages") or {}
    sections: dict[str, type[BaseModel]] = {"paths": Paths}
    for name, spec in stages.items():
        module = importlib.import_module(f"stages.{name}")
        own = config_class(name)
        reads = {**getattr(module, "READS", {}), "train": TrainConfig, name: own}
        for entry in (spec or {}).get("params") or []:
            for key in entry if isinstance(entry, dict) else [entry]:
                top = str(key).split(".")[0]
                if top in reads:
                    sections.setdefault(top, reads[top])
        sections[name] = own  # a stage's own config checks its whole section; another's READS only a part
    for name in FLOWS:
        sections[name] = getattr(importlib.import_module(f"flows.{name}"), f"{name.capitalize()}Config")
    for name in HOW:
        sections[name] = config_class(name)
    return sections


def check_params(params_file: Path = PARAMS_FILE, dvc_file: Path = DVC_FILE, root: Path = Path(".")) -> dict[str, Any]:
    """Load every section of `params_file` the pipeline reads into its typed config and check the
    source paths collect opens; a ConfigError naming every problem's key, or the params as read."""
    params = read_yaml(params_file)
    sections = stage_sections(dvc_file)
    problems: list[str] = []
    for section, cls in sections.items():
        if section not in params:
            problems.append(f"{section}: section is missing")
            continue
        try:
            cfg = cls.model_validate(params[section] or {})
        except ValidationError as err:
            problems.extend(key_problems(err, section))
            continue
        problems.extend(_missing_paths(cfg, section, root))
    problems.extend(f"{key}: unknown section (no stage reads it)" for key in params if key not in sections)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        try:
            shown = Path(params_file).resolve().relative_to(Path(root).resolve())
        except ValueError:
            shown = Path(params_file)
        raise ConfigError(f"{shown} has {count}:\n  " + "\n  ".join(problems))
    return params


# Source types whose path names something other than a local file (a hub dataset, a URL).
REMOTE_SOURCES = ("hf", "url")


def _missing_paths(cfg: BaseModel, where: str, root: Path) -> list[str]:
    """`where.path: ... does not exist` for every local source path in `cfg` (a source is a
    nested config with a `type` and a `path`) that is not on this machine."""
    found: list[str] = []
    for field in type(cfg).model_fields:
        value = getattr(cfg, field)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if not isinstance(item, BaseModel):
                continue
            key = f"{where}.{field}" + (f".{i}" if i is not None else "")
            spec, kind = getattr(item, "path", None), getattr(item, "type", None)
            if isinstance(spec, str) and isinstance(kind, str) and kind not in REMOTE_SOURCES:
                try:
                    path = resolve_path(spec, root)
                except FileNotFoundError as err:
                    found.append(f"{key}.path: {err}")
                    continue
                if not path.exists():
                    found.append(f"{key}.path: {spec} does not exist")
            found.extend(_missing_paths(item, key, root))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.common.params_check",
                                 description="Check a params file against every stage's typed config.")
    ap.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    ap.add_argument("--dvc", type=Path, default=DVC_FILE, help="pipeline graph (default: dvc.yaml)")
    args = ap.parse_args(argv)
    try:
        check_params(args.params, args.dvc)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.params}: every section loads into its stage's config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
