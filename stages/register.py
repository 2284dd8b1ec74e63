"""register: the final model and each quantized variant into the MLflow Model Registry, with lineage.

Reads the final model (`models/ppo/`), every quantized variant (`models/quantized/<method>/`), the
evaluation table (`reports/evaluate/metrics.json`, required: a model is registered with the scores
it was judged by), `dvc.lock` (the lineage, when the project has one) and `params.yaml`.

Each model is logged as an MLflow pyfunc "model from code" (`stages/common/generator.py`, which
loads the folder with transformers, quantization included, and continues prompts greedily) with
the model folder as its artifact, and registered as `register.name` (the final model) or
`<name>-<method>` (a variant). The model version carries, as tags:

- `llm_forge.model_md5`: the folder's content hash, computed as DVC computes a folder's md5, so it
  equals the `md5` of `models/ppo` in `dvc.lock`; `llm_forge.lineage_verified` says whether it does;
- `dvc.<stage>.<deps|outs>.<path>`: the md5 of every dependency and output of every stage in the
  model's upstream chain, as `dvc.lock` recorded them (collect ... ppo, and quantize for a variant);
- `git.commit`, `llm_forge.source` (the evaluation row: `ppo`, `quantized/<method>`);
- `eval.<benchmark>`: the model's row of the evaluation table; `eval.skipped.<benchmark>`: why a cell is empty.

The logged model also holds `lineage.json` (the `dvc.lock` entries of the chain: commands,
hashes, params), the whole `params.yaml` and the whole evaluation table as artifacts, and the
params sections of its chain (from `dvc.lock`) as its params.

A model is registered only when it changed: if a version of that registered model already holds
the same content hash, no version is created and that version is the one the alias points at
(so rerunning the stage, or going back to an earlier model, never makes duplicates). The alias
`register.alias` (`candidate`) always points at the version that holds the current model folder;
`champion` is never touched here (the retraining flow's rule moves it). Before a new version is
logged, the folder is loaded and generates, exactly as the registry will run it: a final model
that does not is an error, a variant that does not is skipped with its reason. Afterwards every
registered model is loaded back by alias (`models:/<name>@candidate`) and continues
`sample_prompt`; the texts go to `reports/register/samples.json`.

The stage logs inside the stage run the runner opens (nested under the flow's parent run); called
without an active run (`--no-mlflow`, or `run` from Python) it opens its own, since the registry
is its output.

    python -m stages.register [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from stages.common import tracking
from stages.common.config import PARAMS_FILE, Paths, StageConfig, StageError
from stages.common.io import write_json
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.register")

STAGE = "register"
GENERATOR = Path(__file__).resolve().parent / "common" / "generator.py"
LOCK_FILE = Path("dvc.lock")
FINAL_ROW = "ppo"  # the evaluation row of `paths.ppo`: rows are named after the stage that wrote the model
MD5_TAG = "llm_forge.model_md5"
TAG_VALUE_MAX = 5000  # MLflow's limit on a model version tag value
RESERVED_ALIASES = ("champion",)  # moved only by the retraining flow's rule


class RegisterConfig(StageConfig):
    """The `register` section: the MLflow Model Registry."""

    name: str = Field("llm-forge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registered model name of the final model; quantized variants register as `<name>-<method>`."""
    alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Alias set on the version that holds the current model (`champion` is the retraining flow's)."""
    sample_prompt: str = "Human: What is the capital of France?\nAssistant:"
    """Prompt every registered model continues after loading back by alias (reports/register/samples.json)."""
    sample_tokens: int = Field(16, ge=1)
    """Greedy tokens of that sample; also the default `max_new_tokens` of the registered model."""

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias: str) -> str:
        if alias in RESERVED_ALIASES:
            raise ValueError(f"`{alias}` moves only by the retraining flow's rule, not at registration")
        if alias == "latest" or re.fullmatch(r"v\d+", alias):
            raise ValueError("MLflow reserves `latest` and `v<number>` (they name versions)")
        return alias


@dataclass
class Candidate:
    """A model folder to register."""

    name: str
    """Registered model name."""
    row: str
    """Its row in the evaluation table (`ppo`, `quantized/<method>`)."""
    folder: Path


# --- content hashes, as DVC computes them ------------------------------------------------------


class Hasher:
    """md5 of files and folders exactly as DVC 3 computes them (`hash: md5` in dvc.lock): a file is
    the md5 of its bytes; a folder is the md5 of the JSON list of `{md5, relpath}` of its files,
    sorted by path, plus `.dir`. File hashes are cached, so a folder and its parent hash once."""

    def __init__(self) -> None:
        self._files: dict[Path, str] = {}

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        if path not in self._files:
            h = hashlib.md5()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._files[path] = h.hexdigest()
        return self._files[path]

    def folder(self, folder: Path) -> str:
        folder = Path(folder)
        entries = sorted(({"md5": self.file(p), "relpath": p.relative_to(folder).as_posix()}
                          for p in folder.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
        return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"

    def path(self, path: Path) -> str:
        return self.folder(path) if Path(path).is_dir() else self.file(path)


# --- lineage from dvc.lock -----------------------------------------------------------------------


def project_path(path: Path) -> str:
    """`path` as dvc.lock writes it: relative to the project root (the working directory), posix."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def read_lock(path: Path = LOCK_FILE) -> dict[str, dict[str, Any]]:
    """The `stages` of dvc.lock; empty when there is none (a project run without DVC)."""
    import yaml

    if not Path(path).is_file():
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise StageError(f"{path} is not valid YAML: {err}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def _covers(out: str, path: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def producer(lock: dict[str, dict[str, Any]], path: str) -> tuple[str, str] | None:
    """(stage, out path) of the stage whose output is `path` or a folder holding it."""
    found = [(len(o["path"]), stage, o["path"]) for stage, entry in lock.items()
             for o in entry.get("outs") or [] if _covers(o["path"], path)]
    return max(found)[1:] if found else None


def upstream(lock: dict[str, dict[str, Any]], path: str) -> list[str]:
    """The stages `path` came from: its producer and, recursively, the producers of their deps,
    in dvc.lock's order (the pipeline's)."""
    first = producer(lock, path)
    todo, seen = ([first[0]] if first else []), set()
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.add(stage)
        for dep in lock[stage].get("deps") or []:
            found = producer(lock, dep["path"])
            if found:
                todo.append(found[0])
    return [s for s in lock if s in seen]


def _hash_value(item: dict[str, Any]) -> str:
    return str(item.get("md5") or item.get("etag") or item.get("checksum") or "")


def tag_key(key: str) -> str:
    """An MLflow tag key: letters, digits and `_ - . / space` (other characters become `_`)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)[:250]


def lineage(lock: dict[str, dict[str, Any]], folder: Path, hasher: Hasher,
            md5: str) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """(version tags, lineage.json, params) of the model in `folder`, from dvc.lock."""
    path = project_path(folder)
    chain = upstream(lock, path)
    if not chain:
        why = "no dvc.lock" if not lock else f"no stage in dvc.lock writes {path}"
        return {"llm_forge.lineage": f"none ({why})"}, {"model": {"path": path, "md5": md5}, "stages": {}}, {}
    stage, out = producer(lock, path)
    recorded = next(_hash_value(o) for o in lock[stage]["outs"] if o["path"] == out)
    current = md5 if out == path else hasher.path(Path(out))
    verified = recorded == current
    if not verified:
        log.warning("register: dvc.lock records %s for %s but the folder hashes to %s: the lineage is of an "
                    "older run (run the pipeline through `dvc repro`)", recorded, out, current)
    tags = {"llm_forge.lineage": "dvc.lock", "llm_forge.dvc_stage": stage,
            "llm_forge.lineage_verified": str(verified).lower()}
    params: dict[str, str] = {}
    for name in chain:
        for kind in ("deps", "outs"):
            for item in lock[name].get(kind) or []:
                tags[tag_key(f"dvc.{name}.{kind}.{item['path']}")] = _hash_value(item)
        for sections in (lock[name].get("params") or {}).values():
            params.update(tracking.flatten(sections or {}))
    doc = {"model": {"path": path, "md5": md5, "stage": stage, "dvc_out": out, "verified": verified},
           "stages": {name: lock[name] for name in chain}}
    return tags, doc, {tag_key(k): v for k, v in params.items()}


# --- the evaluation table ------------------------------------------------------------------------


def read_evaluation(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"evaluation table {path} does not exist (run the evaluate stage): a model is "
                         "registered with the scores it was judged by")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StageError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(table, dict) or not isinstance(table.get("models"), dict):
        raise StageError(f"{path} holds no `models` table (rows of benchmark scores)")
    return table


def eval_tags(table: dict[str, Any], row: str) -> dict[str, str]:
    """`eval.<benchmark>` -> score of `row`; `eval.skipped.<benchmark>` -> why a cell is empty."""
    tags = {tag_key(f"eval.{k}"): str(v) for k, v in (table["models"].get(row) or {}).items()}
    for key, reason in (table.get("skipped") or {}).items():
        if key == row or key.startswith(f"{row}/"):
            cell = key[len(row) + 1:] or "all"
            tags[tag_key(f"eval.skipped.{cell}")] = str(reason)[:TAG_VALUE_MAX]
    return tags


# --- the models -----------------------------------------------------------------------------------


def candidates(cfg: RegisterConfig, paths: Paths) -> tuple[list[Candidate], dict[str, str]]:
    """The final model, then each quantized variant (sorted); and row -> reason for folders skipped."""
    if not (paths.ppo / "config.json").is_file():
        what = "does not exist" if not paths.ppo.exists() else "is not a model folder (no config.json)"
        raise StageError(f"final model {paths.ppo} {what} (run the ppo stage)")
    found = [Candidate(cfg.name, FINAL_ROW, paths.ppo)]
    skipped: dict[str, str] = {}
    if paths.quantized.is_dir():
        for folder in sorted(p for p in paths.quantized.iterdir() if p.is_dir() and not p.name.startswith(".")):
            row = f"quantized/{folder.name}"
            if not (folder / "config.json").is_file():
                skipped[row] = f"{folder} is not a model folder (no config.json)"
                continue
            found.append(Candidate(f"{cfg.name}-{folder.name}", row, folder))
    return found, skipped


def requirements(folder: Path) -> list[str]:
    """What the loading machine needs: mlflow, torch, transformers (pinned to what logged the
    model), and the quantization library the folder's config names."""
    names = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate"]
    from stages.common.lm import read_config

    quant = (read_config(folder).get("quantization_config") or {}).get("quant_method")
    if quant:
        names.append(str(quant))
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")  # no local tag (torch's +cpu)
        except metadata.PackageNotFoundError:
            if name == quant:
                pins.append(name)
    return pins


def signature(cfg: RegisterConfig) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", cfg.sample_tokens)]))


def generate_from_folder(folder: Path, prompt: str, tokens: int) -> str:
    """The folder loaded and run by the same code the registry will run (a skip reason if not)."""
    import mlflow

    from stages.common.generator import Generator

    model = Generator()
    try:
        model.load_context(mlflow.pyfunc.PythonModelContext({"model": str(folder)}, {"max_new_tokens": tokens}))
        return model.predict(None, [prompt])[0]
    except Exception as err:  # any loader or generation failure is "this folder does not load"
        raise StageError(f"{folder} does not load and generate: {type(err).__name__}: {str(err)[:300]}") from err


def existing_version(client: Any, name: str, md5: str) -> Any | None:
    """The newest version of `name` that holds a model with content hash `md5`."""
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(MD5_TAG) == md5]
    return max(same, key=lambda v: int(v.version)) if same else None


def log_and_register(cand: Candidate, cfg: RegisterConfig, tags: dict[str, str], params: dict[str, str],
                     files: dict[str, Path]) -> Any:
    """Log `cand` as a pyfunc model from code in the active run, with its folder and `files` as
    artifacts, and register it as a new version carrying `tags`."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=cand.name, python_model=str(GENERATOR),
        artifacts={"model": str(cand.folder), **{k: str(v) for k, v in files.items()}},
        model_config={"max_new_tokens": cfg.sample_tokens}, signature=signature(cfg),
        input_example=[cfg.sample_prompt], pip_requirements=requirements(cand.folder),
        params=params or None, tags={MD5_TAG: tags[MD5_TAG], "llm_forge.source": cand.row})
    version = mlflow.register_model(info.model_uri, cand.name, tags=tags)
    mlflow.MlflowClient().update_model_version(
        cand.name, version.version,
        description=f"{cand.row} model from {project_path(cand.folder)} (md5 {tags[MD5_TAG]})")
    return version


def load_back(name: str, alias: str, prompt: str, tokens: int) -> str:
    """Load `models:/<name>@<alias>` from the registry and continue `prompt`."""
    import mlflow

    uri = f"models:/{name}@{alias}"
    with tempfile.TemporaryDirectory() as tmp:  # the downloaded copy goes when we are done
        try:
            model = mlflow.pyfunc.load_model(uri, dst_path=tmp)
            return str(model.predict([prompt], params={"max_new_tokens": tokens})[0])
        except Exception as err:  # the folder loaded before logging: the store or the environment broke
            raise StageError(f"{uri} does not load back from the registry: {type(err).__name__}: "
                             f"{str(err)[:300]}") from err


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: RegisterConfig, paths: Paths) -> dict[str, Any]:
    import contextlib

    import mlflow

    evaluation_file = paths.report_dir("evaluate") / "metrics.json"
    table = read_evaluation(evaluation_file)
    models, skipped = candidates(cfg, paths)
    lock = read_lock()
    commit = tracking.git_commit()
    report = paths.report_dir(STAGE)
    report.mkdir(parents=True, exist_ok=True)
    hasher = Hasher()

    registered: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if mlflow.active_run() is None:  # called outside the runner's stage run: the registry is our output
            stack.enter_context(tracking.stage_run(STAGE, cfg.model_dump(mode="json")))
        tracking.setup()
        client = mlflow.MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            lineage_file = Path(tmp) / "lineage.json"
            evaluation_copy = Path(tmp) / "evaluation.json"
            shutil.copy2(evaluation_file, evaluation_copy)
            for cand in models:
                md5 = hasher.folder(cand.folder)
                version = existing_version(client, cand.name, md5)
                folder_sample = None
                if version is None:
                    try:
                        folder_sample = generate_from_folder(cand.folder, cfg.sample_prompt, cfg.sample_tokens)
                    except StageError as err:
                        if cand.row == FINAL_ROW:
                            raise
                        skipped[cand.row] = str(err)
                        log.warning("register: %s skipped: %s", cand.row, err)
                        continue
                    if cand.row not in table["models"]:
                        log.warning("register: %s has no row in %s: registered without scores", cand.row,
                                    evaluation_file)
                    tags, doc, params = lineage(lock, cand.folder, hasher, md5)
                    tags = {MD5_TAG: md5, "llm_forge.source": cand.row, "llm_forge.folder": project_path(cand.folder),
                            **({"git.commit": commit} if commit else {}), **tags, **eval_tags(table, cand.row),
                            "llm_forge.evaluated": str(cand.row in table["models"]).lower()}
                    write_json(lineage_file, {"git_commit": commit, **doc})
                    files = {"lineage": lineage_file, "evaluation": evaluation_copy}
                    if PARAMS_FILE.is_file():
                        files["params"] = PARAMS_FILE
                    version = log_and_register(cand, cfg, tags, params, files)
                    log.info("register: %s version %s (%s, md5 %s)", cand.name, version.version, cand.row, md5)
                else:
                    log.info("register: %s: version %s already holds this model (md5 %s): no new version",
                             cand.name, version.version, md5)
                client.set_registered_model_alias(cand.name, cfg.alias, version.version)
                sample = load_back(cand.name, cfg.alias, cfg.sample_prompt, cfg.sample_tokens)
                new = folder_sample is not None
                registered[cand.name] = {"source": cand.row, "version": int(version.version), "new": new,
                                         "alias": cfg.alias, "model_md5": md5,
                                         "evaluated": cand.row in table["models"]}
                samples[cand.name] = {"uri": f"models:/{cand.name}@{cfg.alias}", "version": int(version.version),
                                      "prompt": cfg.sample_prompt, "sample": sample,
                                      "same_as_folder": (sample == folder_sample) if new else None}
    write_json(report / "samples.json", samples)
    return {
        "registered": registered,
        "models_registered": len(registered),
        "versions_created": sum(r["new"] for r in registered.values()),
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, RegisterConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
