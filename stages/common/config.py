"""Typed configs loaded from `params.yaml`: one loader for every stage.

Each stage declares a pydantic model whose fields are its `params.yaml` section: types, bounds
and a one-line doc per field, and no default for a key params.yaml sets (DVC tracks params by
what params.yaml holds, so a value only in code would be invisible to `dvc params diff`; a test
enforces it). Unknown keys and mistyped values fail with a message that names the
key as written in the params file (`clean.min_words: ...`), never deep inside a stage.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PARAMS_FILE = Path("params.yaml")


class StageError(RuntimeError):
    """Bad input a user can fix: the message is one sentence naming the key, record or file."""


class ConfigError(StageError):
    """A params file that cannot be turned into the typed config a stage asks for."""


class StageConfig(BaseModel):
    """Base for every typed config: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(StageConfig):
    """Where every stage reads and writes: the `paths` section, templated into `dvc.yaml`."""

    raw: Path
    """Collected documents, one Parquet file per kind (corpus, instructions, preferences)."""
    clean: Path
    """Cleaned documents, same layout as `raw`."""
    quarantine: Path
    """Every record `clean` dropped, with its reason."""
    dedup: Path
    """Deduplicated documents, same layout as `clean`."""
    base: Path
    """The base model as a plain Hugging Face folder."""
    tokenized: Path
    """Tokenizer plus packed train/val blocks as a `datasets.DatasetDict`."""
    pretrain: Path
    """The base model after continued pretraining."""
    sft: Path
    """The instruction-tuned model (adapters merged)."""
    reward: Path
    """The reward model (a sequence classifier with one output)."""
    ppo: Path
    """The policy after PPO (or RLOO / GRPO): the pipeline's final model."""
    quantized: Path
    """One folder per quantization method of the final model (`quantized/<method>/`)."""
    reports: Path
    """One folder per stage: `metrics.json`, samples, reports."""

    def report_dir(self, stage: str) -> Path:
        return self.reports / stage


C = TypeVar("C", bound=BaseModel)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping at its top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def overlay(base: dict[str, Any], changes: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`base` with `changes` merged in, mappings recursively; lists and scalars are replaced.

    A key in `changes` that `base` lacks is an error: a profile changes values, it does not
    invent keys that no stage would read.
    """
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in merged:
            raise ConfigError(f"{name}: the profile sets a key that params.yaml does not have")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = overlay(merged[key], value, name)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_section(cls: type[C], section: str, params: dict[str, Any], source: str = "params.yaml") -> C:
    """The `section` of `params` validated into `cls`; errors name `section.key`."""
    if section not in params:
        raise ConfigError(f"{source} has no '{section}' section")
    raw = params[section]
    if raw is None:
        raw = {}
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, section, source)) from None


def _describe(err: ValidationError, section: str, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r:.80})")
    return f"{source}: " + "; ".join(lines)
