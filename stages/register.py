"""register: the final model and each quantized variant into the MLflow Model Registry, with lineage.

Reads the final model (`quantize.model`: `models/dpo` or `models/ppo`), every `models/quantized/<method>/`,
the evaluation table (`reports/evaluate/metrics.json`, required), `dvc.lock` and `params.yaml`. Logs each
as an MLflow pyfunc model from code (`stages/common/generator.py`) named `register.name` or
`<name>-<method>`, with its lineage record (`stages/common/lineage.py`), only when its content changed,
and points `register.alias` at it (never `champion`). Writes `reports/register/` (`metrics.json`,
`samples.json`: each registered model loaded back by alias answering `sample_messages`). README's
"Evaluation, quantization and the registry" tells the record a version carries.

    python -m stages.register [--params params.yaml]
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import lm, tracking
from stages.common.config import PARAMS_FILE, Paths, StageConfig, StageError
from stages.common.evaluation_table import eval_metrics, read_evaluation, row_of, verdict
from stages.common.io import write_json
from stages.common.lineage import LOCK_FILE, Record, dvc_hash, project_path, read_lock, record, tag_key
from stages.common.runner import run_stage
from stages.common.sections import FinalModel, RegisteredModel

log = logging.getLogger("llm_forge.register")

READS = {"quantize": FinalModel}  # `quantize.model`: the final model, the one quantize quantized

STAGE = "register"
GENERATOR = Path(__file__).resolve().parent / "common" / "generator.py"
MD5_TAG = "llm_forge.model_md5"
FOLDER_TAG = "llm_forge.folder"
VERDICT_TAG = "eval.verdict"
TAG_VALUE_MAX = 5000  # MLflow's limit on a model version tag value
# The step of a run's model output. MLflow also links each metric a run logs later at that step
# to the model: the runs' own figures (the stage's, the pipeline's headline) are logged at step 0,
# so the model's outputs are at step 1, and its page shows its own metrics only.
MODEL_STEP = 1


class Message(StageConfig):
    """One chat message, as the registered model takes them."""

    role: Literal["system", "user", "assistant"]
    """Who speaks."""
    content: str
    """What they say."""


class RegisterConfig(RegisteredModel, StageConfig):
    """The `register` section: the MLflow Model Registry (the name and alias, then these)."""

    sample_messages: list[Message] = Field(min_length=1)
    """Chat every registered model answers after loading back by alias (reports/register/samples.json),
    and the input example logged with it; it ends with the user's turn."""
    sample_tokens: int = Field(ge=1)
    """Greedy tokens of that sample; also the default `max_new_tokens` of the registered model."""

    @field_validator("sample_messages")
    @classmethod
    def _user_speaks_last(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError(f"the last message is the {messages[-1].role}'s: the model answers the user's turn")
        return messages


@dataclass
class Candidate:
    """A model folder to register."""

    name: str
    """Registered model name."""
    folder: Path
    row: str | None
    """The evaluation row that scored `folder` (None: the table has none)."""
    final: bool
    """The final model (must register) rather than a variant (skipped when it does not load)."""


# --- the models -----------------------------------------------------------------------------------


def candidates(cfg: RegisterConfig, paths: Paths, table: dict[str, Any],
               quantize: FinalModel) -> tuple[list[Candidate], dict[str, str]]:
    """The final model, then each quantized variant (sorted); and folder -> reason for folders skipped."""
    final = Path(quantize.final(paths))
    if not (final / "config.json").is_file():
        what = "does not exist" if not final.exists() else "is not a model folder (no config.json)"
        raise StageError(f"final model {final} {what} (run the {quantize.model} stage)")
    found = [Candidate(cfg.name, final, row_of(table, final), final=True)]
    skipped: dict[str, str] = {}
    if paths.quantized.is_dir():
        for folder in sorted(p for p in paths.quantized.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / "config.json").is_file():
                skipped[project_path(folder)] = f"{folder} is not a model folder (no config.json)"
                continue
            found.append(Candidate(f"{cfg.name}-{folder.name}", folder, row_of(table, folder), final=False))
    return found, skipped


# quant_method in a folder's config -> the packages that load it (where the names differ)
QUANT_LIBRARIES = {"gptq": ["gptqmodel", "optimum"]}


def requirements(folder: Path) -> list[str]:
    """What the loading machine needs: mlflow, torch, transformers (pinned to what logged the
    model), and the quantization library the folder's config names."""
    names = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate"]
    quant = lm.quant_method(folder)
    libraries = QUANT_LIBRARIES.get(str(quant), [str(quant)]) if quant else []
    pins = []
    for name in names + libraries:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")  # no local tag (torch's +cpu)
        except metadata.PackageNotFoundError:
            if name in libraries:
                pins.append(name)
    return pins


def messages_of(cfg: RegisterConfig) -> list[dict[str, str]]:
    """`sample_messages` as plain dicts, the form the registered model and `lm.greedy` take."""
    return [m.model_dump() for m in cfg.sample_messages]


def folder_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[dict[str, str]] | str:
    """`messages` as `lm.greedy` takes them to render them as the registered model does: the chat
    (rendered with the chat template), or for a tokenizer without one plain `role: content` lines."""
    if tokenizer.chat_template:
        return messages
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def generate_from_folder(folder: Path, messages: list[dict[str, str]], tokens: int) -> str:
    """The folder's greedy answer to `messages` by the pipeline's own generator, from the folder
    alone (its own tokenizer and chat template, as the registry loads it); a StageError if it does
    not load."""
    model = lm.load_causal_lm(folder)
    tokenizer = lm.load_tokenizer(folder)
    try:
        return lm.greedy(model, tokenizer, [folder_prompt(tokenizer, messages)], tokens)[0]
    except StageError:
        raise
    except Exception as err:  # a folder that loads but cannot generate (a broken quantized kernel)
        raise StageError(f"{folder} does not generate: {type(err).__name__}: {str(err)[:300]}") from err


def existing_version(client: Any, name: str, md5: str) -> Any | None:
    """The newest version of `name` that holds a model with content hash `md5`."""
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(MD5_TAG) == md5]
    return max(same, key=lambda v: int(v.version)) if same else None


def log_and_register(cand: Candidate, cfg: RegisterConfig, tags: dict[str, str], rec: Record,
                     metrics: dict[str, float], files: dict[str, Path]) -> Any:
    """Log `cand` as a pyfunc model from code in the active run, with its folder and `files` as
    artifacts, its `metrics` and one size metric per dataset of `rec` (linked to that dataset);
    make it an output of the pipeline's run too; register it as a new version carrying `tags`."""
    import mlflow

    # The signature comes from the type hints of `Generator.predict` (rows of chats or strings) and,
    # for its params, from the input example's `max_new_tokens`; to check its output type, MLflow
    # loads the model and answers that example once more while logging.
    info = mlflow.pyfunc.log_model(
        name=cand.name, python_model=str(GENERATOR),
        artifacts={"model": str(cand.folder), **{k: str(v) for k, v in files.items()}},
        model_config={"max_new_tokens": cfg.sample_tokens},
        input_example=([messages_of(cfg)], {"max_new_tokens": cfg.sample_tokens}),
        pip_requirements=requirements(cand.folder),
        params=rec.params or None, tags={MD5_TAG: tags[MD5_TAG], FOLDER_TAG: tags[FOLDER_TAG]}, step=MODEL_STEP)
    link(info.model_id, metrics, rec.datasets)
    version = mlflow.register_model(info.model_uri, cand.name, tags=tags)
    mlflow.MlflowClient().update_model_version(
        cand.name, version.version,
        description=f"model from {project_path(cand.folder)} (evaluation row {cand.row}, md5 {tags[MD5_TAG]})")
    return version


def link(model_id: str, metrics: dict[str, float], datasets: dict[str, dict[str, Any]]) -> None:
    """The logged model's metrics, in the active run: `metrics`, and per dataset its size, linked
    to the dataset (its path as name, its DVC hash as digest: the model's page lists its
    datasets from these). The pipeline's run (the parent, when a flow runs the stage) gets the
    model as an output, so its page lists the model."""
    import time

    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric

    run_id = mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    rows = [Metric(key, value, now, 0, model_id=model_id, run_id=run_id) for key, value in metrics.items()]
    rows += [Metric(tag_key(f"{path}.bytes"), float(d["size"]), now, 0, model_id=model_id, run_id=run_id,
                    dataset_name=path, dataset_digest=d["md5"][:tracking.DIGEST_CHARS])
             for path, d in datasets.items() if isinstance(d.get("size"), (int, float))]
    client = mlflow.MlflowClient()
    if rows:
        client.log_batch(run_id, metrics=rows)
    parent = os.environ.get(tracking.PARENT_ENV)
    if parent and parent != run_id:
        client.log_outputs(parent, [LoggedModelOutput(model_id, step=MODEL_STEP)])


def load_back(name: str, alias: str, messages: list[dict[str, str]], tokens: int) -> str:
    """Load `models:/<name>@<alias>` from the registry and answer the chat `messages`."""
    import mlflow

    uri = f"models:/{name}@{alias}"
    with tempfile.TemporaryDirectory() as tmp:  # the downloaded copy goes when we are done
        try:
            model = mlflow.pyfunc.load_model(uri, dst_path=tmp)
            return str(model.predict([messages], params={"max_new_tokens": tokens})[0])
        except Exception as err:  # the folder loaded before logging: the store or the environment broke
            raise StageError(f"{uri} does not load back from the registry: {type(err).__name__}: "
                             f"{str(err)[:300]}") from err


# --- the stage ----------------------------------------------------------------------------------


def register_one(cand: Candidate, cfg: RegisterConfig, paths: Paths, table: dict[str, Any],
                 lock: dict[str, Any], md5: str, files: dict[str, Path]) -> tuple[Any, str]:
    """Check that `cand` loads and generates, then log and register it with its record and scores:
    (the new version, the folder's greedy sample)."""
    sample = generate_from_folder(cand.folder, messages_of(cfg), cfg.sample_tokens)
    if cand.row not in table["models"]:
        log.warning("%s has no scores in the evaluation table: registered without them", project_path(cand.folder))
    rec = record(lock, cand.folder, md5, reports=paths.reports, params_file=PARAMS_FILE)
    tags = {**rec.tags, VERDICT_TAG: verdict(table, cand.row)[:TAG_VALUE_MAX], MD5_TAG: md5,
            FOLDER_TAG: project_path(cand.folder)}
    write_json(files["lineage"], {**rec.doc, "evaluation": {"row": cand.row, "verdict": tags[VERDICT_TAG]}})
    version = log_and_register(cand, cfg, tags, rec, eval_metrics(table, cand.row), files)
    log.info("%s version %s (%s, md5 %s)", cand.name, version.version, project_path(cand.folder), md5)
    return version, sample


def run(cfg: RegisterConfig, paths: Paths, quantize: FinalModel) -> dict[str, Any]:
    import contextlib

    import mlflow

    evaluation_file = paths.report_dir("evaluate") / "metrics.json"
    table = read_evaluation(evaluation_file)
    models, skipped = candidates(cfg, paths, table, quantize)
    lock = read_lock()
    registered: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if mlflow.active_run() is None:  # called outside the runner's stage run: the registry is our output
            stack.enter_context(tracking.stage_run(STAGE, cfg.model_dump(mode="json")))
        tracking.setup()
        client = mlflow.MlflowClient()
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        files = {"lineage": tmp / "lineage.json", "evaluation": tmp / "evaluation.json"}
        shutil.copy2(evaluation_file, files["evaluation"])
        if PARAMS_FILE.is_file():
            files["params"] = PARAMS_FILE
        if LOCK_FILE.is_file():
            files["dvc.lock"] = LOCK_FILE
        for cand in models:
            md5 = dvc_hash(cand.folder)
            version, folder_sample = existing_version(client, cand.name, md5), None
            if version is None:
                try:
                    version, folder_sample = register_one(cand, cfg, paths, table, lock, md5, files)
                except StageError as err:
                    if cand.final:
                        raise
                    skipped[project_path(cand.folder)] = str(err)
                    log.warning("%s skipped: %s", project_path(cand.folder), err)
                    continue
            else:
                log.info("%s: version %s already holds this model (md5 %s): no new version",
                         cand.name, version.version, md5)
            client.set_registered_model_alias(cand.name, cfg.alias, version.version)
            sample = load_back(cand.name, cfg.alias, messages_of(cfg), cfg.sample_tokens)
            new = folder_sample is not None
            registered[cand.name] = {"folder": project_path(cand.folder), "source": cand.row,
                                     "version": int(version.version), "new": new, "alias": cfg.alias,
                                     "model_md5": md5, "evaluated": cand.row in table["models"]}
            samples[cand.name] = {"uri": f"models:/{cand.name}@{cfg.alias}", "version": int(version.version),
                                  "messages": messages_of(cfg), "sample": sample,
                                  "same_as_folder": (sample == folder_sample) if new else None}
    write_json(paths.report_dir(STAGE) / "samples.json", samples)
    return {
        "registered": registered,
        "models_registered": len(registered),
        "versions_created": sum(r["new"] for r in registered.values()),
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, RegisterConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
