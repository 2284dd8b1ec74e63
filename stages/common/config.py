"""Typed configs loaded from `params.yaml`: one loader for every stage.

Each stage declares a pydantic model whose fields are its `params.yaml` section: types, bounds
and a one-line doc per field, and no default for a key params.yaml sets (DVC tracks params by
what params.yaml holds, so a value only in code would be invisible to `dvc params diff`; a test
enforces it). Unknown keys and mistyped values fail with a message that names the
key as written in the params file (`clean.min_words: ...`), never deep inside a stage. The
whole file is checked at once by `stages.common.params_check`. This module imports no other
module of the project: every other one may import it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")


class StageError(RuntimeError):
    """Bad input a user can fix: the message is one sentence naming the key, record or file."""


class ConfigError(StageError):
    """A params file that cannot be turned into the typed config a stage asks for."""


class SectionPart(BaseModel):
    """The keys of another stage's section that a stage reads (its `READS`): the stage that owns
    the section declares its config as this part plus its own keys, so each key has one type, and
    checks the rest of the section."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class StageConfig(BaseModel):
    """Base for every typed config: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(StageConfig):
    """Where every stage reads and writes: the `paths` section, templated into `dvc.yaml`."""

    raw: Path
    """Collected documents: per kind (corpus, instructions, preferences) a folder of Parquet shards."""
    clean: Path
    """Cleaned documents, same layout as `raw`."""
    quarantine: Path
    """Every record `clean` dropped, with its reason."""
    decontam: Path
    """Cleaned documents without any that overlap an evaluation set, same layout as `clean`."""
    contaminated: Path
    """Every record `decontam` removed, with the benchmark item it overlaps."""
    dedup: Path
    """Deduplicated documents, same layout as `clean`: the training data."""
    base: Path
    """The base model as a plain Hugging Face folder."""
    tokenized: Path
    """Tokenizer plus packed train/val blocks as a `datasets.DatasetDict`."""
    pretrain: Path
    """The base model after continued pretraining."""
    sft: Path
    """The instruction-tuned model (adapters merged)."""
    reward: Path
    """The proxy reward model (a sequence classifier with one output): what `ppo` optimizes."""
    judge: Path
    """The judge (a sequence classifier trained like the proxy on another part of the preference
    data): only `evaluate` and the champion gate score with it."""
    reference: Path
    """The policy part of the preference pairs, with the sft model's log-probabilities of each answer."""
    ppo: Path
    """The policy after PPO (or RLOO / GRPO)."""
    dpo: Path
    """The policy after offline preference optimisation (DPO, KTO, ORPO or SimPO)."""
    quantized: Path
    """One folder per quantization method of the final model (`quantized/<method>/`)."""
    reports: Path
    """One folder per stage: `metrics.json`, samples, reports."""
    gate: Path
    """The registry's `candidate` and `champion` (`gate/candidate/`, `gate/champion/`), downloaded
    by the retraining flow to be scored side by side; not a DVC output."""

    def report_dir(self, stage: str) -> Path:
        return self.reports / stage

    def sft_held_out(self) -> Path:
        """The instructions sft held out, as it rendered them (prompt-completion, cut to its
        `max_length`) and in its order: sft writes them, evaluate measures the instruction loss on them."""
        return self.report_dir("sft") / "held_out.jsonl"


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
        raise ConfigError(f"{source}: " + "; ".join(key_problems(err, section))) from None


def key_problems(err: ValidationError, section: str) -> list[str]:
    """One line per problem of `err`, naming its key as written in the params file."""
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r:.80})")
    return lines


def config_class(stage: str) -> type[BaseModel]:
    """The typed config of `stages/<stage>.py`: the class named `<Stage>Config` (or of a `HOW`
    section)."""
    if stage in HOW:
        module_name, _, cls = HOW[stage].partition(":")
        return getattr(importlib.import_module(module_name), cls)
    module = importlib.import_module(f"stages.{stage}")
    return next(v for k, v in vars(module).items() if k.lower() == f"{stage}config" and isinstance(v, type))


# Sections that say how stages run, never what they write (`data`: the executor of the data
# stages): the stages read them, but no `dvc.yaml` stage lists them, so another executor or worker
# count keeps DVC's cache. Section -> "module:Class" of its typed config.
HOW = {"data": "stages.common.shards:DataConfig"}


def resolve_path(spec: str | Path, root: Path = Path(".")) -> Path:
    """A path from params: `pkg://package/rel/path` is a file inside an installed package
    (the offline assets ship that way), anything else is relative to the project root."""
    spec = str(spec)
    if spec.startswith("pkg://"):
        package, _, rel = spec[len("pkg://") :].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: package '{package}' is not installed (run `make setup`)")
        return Path(list(found.submodule_search_locations)[0]) / rel
    path = Path(spec)
    return path if path.is_absolute() else root / path
