"""register: models into the MLflow Model Registry with lineage, loaded back by alias; no duplicates.

The final model is the tiny random-init base (weights scaled up) with the tiny tokenizer (as
`models/ppo`), the variant a torchao int8 copy of it (`models/quantized/torchao_int8`); the
evaluation table and `dvc.lock` are written here in the shapes the evaluate stage and DVC write;
the project is a git repository with one commit, as a user's checkout. One SQLite store serves the
whole module (creating one takes seconds); each test registers under a name of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stages.common import lm, tracking
from stages.common.config import ConfigError, Paths, StageError, load_section
from stages.common.evaluation_table import eval_metrics, verdict
from stages.common.generator import prompt_ids, rows_of
from stages.common.lineage import dvc_hash, upstream
from stages.register import RegisterConfig, folder_prompt, messages_of, run
from tests.conftest import git_in, run_in, tiny_config, tiny_model, tiny_params

EVALUATION = {
    "models": {
        "base": {"perplexity": 1100.0, "hhh_alignment": 0.5},
        "ppo": {"perplexity": 1021.5, "hhh_alignment": 0.75},
        "quantized/torchao_int8": {"perplexity": 1022.0, "hhh_alignment": 0.5},
    },
    "metric": {"hhh_alignment": "acc"},
    "folders": {"base": "models/base", "ppo": "models/ppo", "quantized/torchao_int8": "models/quantized/torchao_int8",
                "quantized/nf4": "models/quantized/nf4"},
    "skipped": {"ppo/humaneval_sandbox": "generation timed out", "quantized/nf4": "does not load"},
    "comparisons": {  # in evaluate's shape: each row against the one before it, 95% paired intervals
        "ppo": {"against": "base",
                "perplexity": {"diff": -78.5, "low": -90.0, "high": -60.0, "n": 4, "level": 0.95, "significant": True,
                               "better": True},
                "hhh_alignment": {"diff": 0.25, "low": -0.25, "high": 0.5, "n": 4, "level": 0.95,
                                  "significant": False, "better": False}},
        "quantized/torchao_int8": {"against": "ppo",
                                   "perplexity": {"diff": 0.5, "low": 0.1, "high": 0.9, "n": 4, "level": 0.95,
                                                  "significant": True, "better": False}}},
    "cells": 6,
}
QUESTIONS = ["hello", "Why is the sky blue?"]
CHATS = [[{"role": "user", "content": "hello"}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]]


# --- the store and the inputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """MLFLOW_TRACKING_URI -> a SQLite file of this module, its artifacts beside it."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv(tracking.PARENT_ENV, raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment(tracking.EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
        yield uri


def build_final_model(paths: Paths) -> None:
    """models/ppo: the tiny base with the tiny tokenizer beside it, its weights scaled up: at the
    init's scale a random model repeats the prompt's last token, and every chat's rendering ends
    with the same generation prompt, so its answers would not show which chat it answered."""
    from safetensors.torch import load_file, save_file

    tiny_model(paths, paths.ppo)
    weights = paths.ppo / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v if "norm" in k else 5 * v for k, v in state.items()}, str(weights), metadata={"format": "pt"})


def build_torchao_variant(paths: Paths) -> Path:
    """models/quantized/torchao_int8: int8 weight-only, saved as the quantize stage saves it."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    out = paths.quantized / "torchao_int8"
    model = AutoModelForCausalLM.from_pretrained(paths.ppo, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(paths.ppo).save_pretrained(out)
    return out


def lock_entry(path: str, root: Path) -> dict:
    out = {"path": path, "hash": "md5", "md5": dvc_hash(root / path)}
    if (root / path).is_dir():  # what DVC records of a folder beside its hash
        files = [p for p in (root / path).rglob("*") if p.is_file()]
        out.update(size=sum(p.stat().st_size for p in files), nfiles=len(files))
    return out


def write_lock(root: Path) -> dict:
    """A dvc.lock in DVC's format: base -> tokenize -> ppo -> quantize -> evaluate, plus a stage
    (`reward`) the final model does not come from."""
    stage_file = {"path": "stages/x.py", "hash": "md5", "md5": "0c7278abc074fde0cf7b32a04058f79a", "size": 10}
    lock = {"schema": "2.0", "stages": {
        "base": {"cmd": "python -m stages.base", "deps": [stage_file],
                 "params": {"params.yaml": {"base": {"dtype": "float32"}}},
                 "outs": [lock_entry("models/base", root)]},
        "tokenize": {"cmd": "python -m stages.tokenize", "deps": [lock_entry("models/base", root)],
                     "params": {"params.yaml": {"tokenize": {"block_size": 64}}},
                     "outs": [lock_entry("data/tokenized", root)]},
        "reward": {"cmd": "python -m stages.reward", "deps": [lock_entry("data/dedup", root)],
                   "outs": [{"path": "models/reward", "hash": "md5", "md5": "1" * 32 + ".dir"}]},
        "ppo": {"cmd": "python -m stages.ppo",
                "deps": [lock_entry("data/tokenized", root), lock_entry("models/base", root)],
                "params": {"params.yaml": {"ppo": {"updates": 2, "algorithm": "ppo"}}},
                "outs": [lock_entry("models/ppo", root),
                         {"path": "reports/ppo/metrics.json", "hash": "md5", "md5": "2" * 32}]},
        "quantize": {"cmd": "python -m stages.quantize", "deps": [lock_entry("models/ppo", root)],
                     "params": {"params.yaml": {"quantize": {"methods": ["torchao_int8"]}}},
                     "outs": [lock_entry("models/quantized", root)]},
        "evaluate": {"cmd": "python -m stages.evaluate", "deps": [lock_entry("models/ppo", root)],
                     "outs": [{"path": "reports/evaluate/metrics.json", "hash": "md5", "md5": "3" * 32}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return lock


@pytest.fixture
def project(tiny_workdir: Paths, store: str, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """The tiny workdir as a project: models/ppo, models/quantized/torchao_int8, the evaluation
    table, dvc.lock and params.yaml, with the working directory at its root; a git repository
    whose commit holds it (data and models ignored, as DVC ignores its outputs)."""
    root = tiny_workdir.reports.parent
    build_final_model(tiny_workdir)
    build_torchao_variant(tiny_workdir)
    (tiny_workdir.report_dir("evaluate")).mkdir(parents=True)
    (tiny_workdir.report_dir("evaluate") / "metrics.json").write_text(json.dumps(EVALUATION))
    write_lock(root)
    monkeypatch.chdir(root)
    # relative paths, as in the real params.yaml: dvc.lock names them so
    rel = Paths(**{k: Path(v).relative_to(root) for k, v in tiny_workdir.model_dump().items()})
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {k: str(v) for k, v in rel.model_dump().items()}}))
    (root / ".gitignore").write_text("/data/\n/models/\n")
    git_in(root, "init", "-q")
    git_in(root, "add", "-A")
    git_in(root, "commit", "-q", "-m", "a project")
    return rel


def config(request: pytest.FixtureRequest, **kw) -> RegisterConfig:
    """The tiny profile's section under a registered-model name of this test's own (the store is
    shared by the module)."""
    return tiny_config("register", name=f"t-{request.node.name.replace('_', '-')[5:45]}", **kw)


def client():
    import mlflow

    return mlflow.MlflowClient()


def versions(name: str) -> list:
    return sorted(client().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def generate_by_alias(name: str, rows: list = CHATS, alias: str = "candidate", tokens: int = 6) -> list[str]:
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}").predict(rows, params={"max_new_tokens": tokens})


def generate_from_folder(folder: Path, chats: list = CHATS, tokens: int = 6) -> list[str]:
    """The folder's chat template rendered on each chat, with the assistant's generation prompt,
    continued by the pipeline's own greedy generator: what the registered model must answer."""
    tokenizer = lm.load_tokenizer(folder)
    assert tokenizer.chat_template  # the tiny tokenizer's ChatML
    rendered = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for chat in chats]
    return lm.greedy(lm.load_causal_lm(folder), tokenizer, rendered, tokens)


# --- helpers on inline data -----------------------------------------------------------------------


def test_hash_is_dvcs(tmp_path: Path) -> None:
    """The content hash is DVC's own md5 (its code computes it): what `dvc add` records of a folder
    and of a file, inside a DVC project (honouring .dvcignore) and outside one."""
    project = tmp_path / "project"
    folder = project / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    (project / "notes.txt").write_text("a file\n")
    outside = dvc_hash(folder), dvc_hash(project / "notes.txt")
    run_in(project, "-m", "dvc", "init", "--no-scm", "-q")
    (project / ".dvcignore").write_text("*.log\n")
    (folder / "train.log").write_text("not part of the model\n")  # ignored, as DVC ignores it
    run_in(project, "-m", "dvc", "add", "-q", "model", "notes.txt")
    for path, hashed in zip(("model", "notes.txt"), outside, strict=True):
        (recorded,) = yaml.safe_load((project / f"{path}.dvc").read_text())["outs"]
        assert dvc_hash(project / path, project) == recorded["md5"] == hashed, path
    assert outside[0].endswith(".dir") and not outside[1].endswith(".dir")


def test_upstream_chain_follows_deps_to_their_producers() -> None:
    def st(deps: list[str], outs: list[str]) -> dict:
        return {"deps": [{"path": p, "md5": "x"} for p in deps], "outs": [{"path": p, "md5": "y"} for p in outs]}

    lock = {"collect": st(["stages/collect.py"], ["data/raw"]), "clean": st(["data/raw"], ["data/clean"]),
            "base": st([], ["models/base"]), "sft": st(["models/base", "data/clean"], ["models/sft"]),
            "reward": st(["data/clean"], ["models/reward"]), "ppo": st(["models/sft", "models/reward"], ["models/ppo"]),
            "quantize": st(["models/ppo"], ["models/quantized"]),
            "evaluate": st(["models/ppo"], ["reports/evaluate/m.json"])}
    assert upstream(lock, "models/ppo") == ["collect", "clean", "base", "sft", "reward", "ppo"]
    assert upstream(lock, "models/quantized/nf4") == ["collect", "clean", "base", "sft", "reward", "ppo", "quantize"]
    assert upstream(lock, "models/sft") == ["collect", "clean", "base", "sft"]
    assert upstream(lock, "models/other") == [] and upstream({}, "models/ppo") == []


def test_the_evaluation_verdict_is_one_line_and_the_scores_are_metrics() -> None:
    assert verdict(EVALUATION, "ppo") == ("against base: better on perplexity; no clear change on 1 (95% paired "
                                          "intervals); 1 cell skipped")
    assert verdict(EVALUATION, "quantized/torchao_int8") == "against ppo: worse on perplexity (95% paired intervals)"
    assert verdict(EVALUATION, "base") == "scored on 2 metrics, no row before it to compare with"
    assert verdict(EVALUATION, "quantized/nf4").startswith("not evaluated") and verdict(EVALUATION, None) == \
        verdict(EVALUATION, "quantized/nf4")
    assert eval_metrics(EVALUATION, "ppo") == {"ppo.perplexity": 1021.5, "ppo.hhh_alignment": 0.75}
    assert eval_metrics(EVALUATION, None) == {}


def test_rows_are_chats_or_strings_and_raw_text_without_a_chat_template(tiny_inputs: Paths) -> None:
    """The registered model's input: a bad row is named; a tokenizer without a chat template (a
    base model's) continues the string itself, and a chat as plain `role: content` lines."""
    assert rows_of(["hi", CHATS[1]]) == ["hi", CHATS[1]]
    for bad in ([3], [[]], [[{"role": "user"}]], [{"role": "user", "content": "hi"}]):
        with pytest.raises(ValueError, match="input row 0 is .*each row is a string or a non-empty list of messages"):
            rows_of(bad)
    tokenizer = lm.load_tokenizer(tiny_inputs.tokenized / "tokenizer")
    assert prompt_ids(tokenizer, "hello") == prompt_ids(tokenizer, CHATS[0]) != tokenizer("hello")["input_ids"]
    tokenizer.chat_template = None
    assert prompt_ids(tokenizer, "The sky is") == tokenizer("The sky is")["input_ids"]
    lines = "system: Answer briefly.\nuser: Why is the sky blue?"
    assert prompt_ids(tokenizer, CHATS[1]) == tokenizer(lines)["input_ids"]
    assert folder_prompt(tokenizer, CHATS[1]) == lines  # register's own check renders it alike


def test_config_guards_the_alias_and_the_name() -> None:
    section = tiny_params()["register"]
    for alias in ("champion", "latest", "v3"):
        with pytest.raises(ConfigError, match=r"register\.alias"):
            load_section(RegisterConfig, "register", {"register": {**section, "alias": alias}})
    with pytest.raises(ConfigError, match=r"register\.name"):
        load_section(RegisterConfig, "register", {"register": {**section, "name": "my model/v1"}})
    answered = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(ConfigError, match=r"register\.sample_messages.*the model answers the user's turn"):
        load_section(RegisterConfig, "register", {"register": {**section, "sample_messages": answered}})


# --- the stage ------------------------------------------------------------------------------------


def test_registers_every_model_with_lineage_and_loads_it_back_by_alias(project: Paths,
                                                                       request: pytest.FixtureRequest,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI (the runner's stage run, under a pipeline run): both models, their record,
    artifacts, metrics and datasets, and their samples."""
    import mlflow

    from stages.register import main

    cfg = config(request)
    params = yaml.safe_load(Path("params.yaml").read_text())
    Path("params.yaml").write_text(yaml.safe_dump({**params, "register": cfg.model_dump(),
                                                   "quantize": tiny_config("quantize").model_dump(mode="json")}))
    git_in(Path("."), "commit", "-q", "-am", "the register section")  # params are records, but commit them all
    pipeline = client().create_run(client().get_experiment_by_name(tracking.EXPERIMENT).experiment_id,
                                   run_name="pipeline")
    monkeypatch.setenv(tracking.PARENT_ENV, pipeline.info.run_id)
    assert main([]) == 0
    client().set_terminated(pipeline.info.run_id)
    metrics = json.loads((project.report_dir("register") / "metrics.json").read_text())
    variant = f"{cfg.name}-torchao_int8"
    assert metrics["models_registered"] == 2 and metrics["versions_created"] == 2 and metrics["skipped"] == {}
    assert metrics["registered"][cfg.name] == {
        "folder": "models/ppo", "source": "ppo", "version": 1, "new": True, "alias": "candidate",
        "model_md5": dvc_hash(project.ppo), "evaluated": True}
    assert metrics["registered"][variant]["source"] == "quantized/torchao_int8"

    # the version's record: a handful of short tags
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    final = client().get_model_version_by_alias(cfg.name, "candidate")
    tags = final.tags
    assert str(final.version) == "1"
    head = git_in(Path("."), "rev-parse", "HEAD").stdout.strip()
    assert tags == {
        "git.commit": head, "git.clean": "true",
        "params.md5": dvc_hash(Path("params.yaml")), "dvc.lock.md5": dvc_hash(Path("dvc.lock")),
        "data.md5": tags["data.md5"],
        "eval.verdict": verdict(EVALUATION, "ppo"),
        "llm_forge.model_md5": lock["ppo"]["outs"][0]["md5"],  # the dvc.lock hash of models/ppo
        "llm_forge.folder": "models/ppo", "llm_forge.lineage": "verified"}
    tokenized = lock["tokenize"]["outs"][0]
    import hashlib

    # the data it was trained on: data/tokenized (models/base is a model, data/dedup not in its chain)
    assert tags["data.md5"] == hashlib.md5(f"data/tokenized {tokenized['md5']}\n".encode()).hexdigest()
    vtags = client().get_model_version_by_alias(variant, "candidate").tags
    assert vtags["llm_forge.lineage"] == "verified" and vtags["llm_forge.folder"] == "models/quantized/torchao_int8"
    assert vtags["eval.verdict"] == "against ppo: worse on perplexity (95% paired intervals)"
    assert vtags["data.md5"] == tags["data.md5"] and vtags["dvc.lock.md5"] == tags["dvc.lock.md5"]

    # logged in the runner's stage run, with params.yaml, dvc.lock, lineage and the evaluation table
    # beside the weights
    assert client().get_run(final.run_id).info.run_name == "register"
    logged = mlflow.get_logged_model(final.source.removeprefix("models:/"))  # the version's LoggedModel
    assert logged.params["ppo.updates"] == "2" and logged.params["base.dtype"] == "float32"
    files = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(f"models:/{cfg.name}@candidate/artifacts")}
    assert {"ppo", "lineage.json", "evaluation.json", "params.yaml", "dvc.lock"} <= files  # the folder keeps its name
    lineage = mlflow.artifacts.download_artifacts(f"models:/{cfg.name}/1/artifacts/lineage.json")
    record = json.loads(Path(lineage).read_text())
    assert record["git"] == {"commit": head, "clean": True, "uncommitted": []}
    assert list(record["stages"]) == ["base", "tokenize", "ppo"] == upstream(lock, "models/ppo")
    assert record["datasets"] == {"data/tokenized": {"md5": tokenized["md5"], "size": tokenized["size"],
                                                     "files": tokenized["nfiles"]}}
    assert record["machine"]["torch_threads"] >= 1 and record["model"]["verified"] is True
    # the model's metrics: its evaluation row, and its dataset's size linked to the dataset (the
    # model's page lists the datasets from these); the pipeline run lists the model as an output
    found = {(m.key, m.dataset_name, m.dataset_digest): m.value for m in logged.metrics}
    assert found == {("ppo.perplexity", None, None): 1021.5, ("ppo.hhh_alignment", None, None): 0.75,
                     ("data/tokenized.bytes", "data/tokenized", tokenized["md5"]): tokenized["size"]}
    outputs = client().get_run(pipeline.info.run_id).outputs.model_outputs
    assert {o.model_id for o in outputs} == {logged.model_id, mlflow.get_logged_model(
        client().get_model_version_by_alias(variant, "candidate").source.removeprefix("models:/")).model_id}

    # loaded back from the registry, each answers a chat as the pipeline's greedy generator answers
    # the folder's chat-template rendering of it; a string is one user message
    for name, folder in ((cfg.name, project.ppo), (variant, project.quantized / "torchao_int8")):
        texts = generate_by_alias(name)
        assert texts == generate_from_folder(folder) and all(t.strip() for t in texts), name
        assert len(set(texts)) == len(texts), name  # each answer depends on its chat
        assert generate_by_alias(name, [QUESTIONS[0], CHATS[1]]) == texts, name
    single = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert generate_by_alias(cfg.name, QUESTIONS) == generate_by_alias(cfg.name, single)
    assert generate_by_alias(cfg.name, single) == generate_from_folder(project.ppo, single)
    signature = mlflow.models.get_model_info(f"models:/{cfg.name}@candidate").signature
    assert signature.params.to_dict() == [{"name": "max_new_tokens", "type": "long", "default": cfg.sample_tokens,
                                           "shape": None}]
    samples = json.loads((project.report_dir("register") / "samples.json").read_text())
    assert set(samples) == {cfg.name, variant}
    assert samples[cfg.name]["uri"] == f"models:/{cfg.name}@candidate"
    assert samples[cfg.name]["messages"] == messages_of(cfg) == tiny_params()["register"]["sample_messages"]
    assert samples[cfg.name]["sample"] == generate_from_folder(project.ppo, [messages_of(cfg)], cfg.sample_tokens)[0]
    assert all(s["same_as_folder"] is True for s in samples.values())


def test_unchanged_model_is_not_registered_again_and_a_changed_one_moves_the_alias(
        project: Paths, request: pytest.FixtureRequest) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    cfg = config(request)
    variant = f"{cfg.name}-torchao_int8"
    run(cfg, project, tiny_config("quantize"))
    again = run(cfg, project, tiny_config("quantize"))
    assert again["versions_created"] == 0 and again["models_registered"] == 2
    assert again["registered"][cfg.name]["version"] == 1 and again["registered"][cfg.name]["new"] is False
    assert len(versions(cfg.name)) == 1 and len(versions(variant)) == 1

    weights = project.ppo / "model.safetensors"
    original = weights.read_bytes()
    state = load_file(str(weights))
    torch.manual_seed(1)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    changed = run(cfg, project, tiny_config("quantize"))
    assert changed["registered"][cfg.name] == {**changed["registered"][cfg.name], "version": 2, "new": True}
    assert changed["registered"][variant]["new"] is False  # its folder did not change
    assert str(client().get_model_version_by_alias(cfg.name, "candidate").version) == "2"
    v2 = versions(cfg.name)[1]
    assert v2.tags["llm_forge.lineage"].startswith("unverified: dvc.lock records ")  # it describes the old models/ppo
    assert v2.tags["git.clean"] == "true"  # new weights are an output, not code
    assert generate_by_alias(cfg.name) == generate_from_folder(project.ppo)  # the alias serves the new weights

    weights.write_bytes(original)  # back to the first model: its version again, no duplicate
    back = run(cfg, project, tiny_config("quantize"))
    assert back["registered"][cfg.name]["version"] == 1 and back["versions_created"] == 0
    assert str(client().get_model_version_by_alias(cfg.name, "candidate").version) == "1"
    assert len(versions(cfg.name)) == 2


def test_missing_inputs_are_named_and_register_nothing(project: Paths, request: pytest.FixtureRequest) -> None:
    cfg = config(request)
    evaluation = project.report_dir("evaluate") / "metrics.json"
    evaluation.unlink()
    with pytest.raises(StageError, match="evaluation table .*metrics.json does not exist \\(run the evaluate stage\\)"):
        run(cfg, project, tiny_config("quantize"))
    evaluation.write_text('{"rows": []}')
    with pytest.raises(StageError, match="holds no `models` table"):
        run(cfg, project, tiny_config("quantize"))
    evaluation.write_text(json.dumps({k: v for k, v in EVALUATION.items() if k != "folders"}))
    with pytest.raises(StageError, match=r"holds no `folders` \(row -> model folder\)"):
        run(cfg, project, tiny_config("quantize"))
    evaluation.write_text(json.dumps(EVALUATION))
    shutil.rmtree(project.ppo)
    with pytest.raises(StageError, match=r"final model models/ppo does not exist \(run the ppo stage\)"):
        run(cfg, project, tiny_config("quantize"))
    assert versions(cfg.name) == [] and versions(f"{cfg.name}-torchao_int8") == []


def test_the_final_model_is_the_one_quantize_model_names(project: Paths) -> None:
    from stages.register import candidates

    dpo = tiny_config("quantize", model="dpo")
    with pytest.raises(StageError, match=r"final model models/dpo does not exist \(run the dpo stage\)"):
        candidates(tiny_config("register"), project, EVALUATION, dpo)
    shutil.copytree(project.ppo, project.dpo)
    table = {**EVALUATION, "folders": {**EVALUATION["folders"], "dpo": "models/dpo"}}
    final, *variants = candidates(tiny_config("register"), project, table, dpo)[0]
    assert final.folder == project.dpo and final.row == "dpo" and final.final
    assert [v.folder for v in variants] == [project.quantized / "torchao_int8"]


def test_models_that_do_not_load_are_skipped_or_stop_the_stage(project: Paths, request: pytest.FixtureRequest,
                                                               capsys: pytest.CaptureFixture) -> None:
    cfg = config(request)
    broken = project.quantized / "nf4"
    shutil.copytree(project.quantized / "torchao_int8", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (project.quantized / "notes").mkdir()
    Path("dvc.lock").unlink()  # and no lineage to read: registered all the same, marked so
    m = run(cfg, project, tiny_config("quantize"))
    assert set(m["registered"]) == {cfg.name, f"{cfg.name}-torchao_int8"}
    assert "does not load" in m["skipped"]["models/quantized/nf4"]
    assert str(broken) in m["skipped"]["models/quantized/nf4"]
    assert "not a model folder" in m["skipped"]["models/quantized/notes"]
    assert versions(f"{cfg.name}-nf4") == []
    tags = client().get_model_version_by_alias(cfg.name, "candidate").tags
    assert tags["llm_forge.lineage"] == "none: no dvc.lock" and tags["dvc.lock.md5"] == "none (no dvc.lock)"
    assert tags["data.md5"] == "none (no data in dvc.lock)"

    (project.ppo / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(StageError, match="models/ppo does not load"):
        run(cfg, project, tiny_config("quantize"))
    assert len(versions(cfg.name)) == 1


def test_cli_reports_bad_input_in_one_line(project: Paths, request: pytest.FixtureRequest,
                                           capsys: pytest.CaptureFixture) -> None:
    from stages.register import main

    cfg = config(request)
    params = yaml.safe_load(Path("params.yaml").read_text())
    Path("params.yaml").write_text(yaml.safe_dump({**params, "register": cfg.model_dump(),
                                                   "quantize": tiny_config("quantize").model_dump(mode="json")}))
    (project.report_dir("evaluate") / "metrics.json").unlink()
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: register: evaluation table ")  # the stage named once
    assert "run the evaluate stage" in err[0]
    assert versions(cfg.name) == []


def test_a_version_made_from_uncommitted_code_is_marked_and_not_rebuilt(project: Paths, request: pytest.FixtureRequest,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A code change not committed: the version says so, and `flows.reproduce` refuses it (exit 2,
    one sentence). A clean version of a commit this repository lacks is refused the same way."""
    import mlflow

    from flows.reproduce import main as reproduce

    cfg = config(request)
    run(cfg, project, tiny_config("quantize"))  # from the committed tree: clean
    assert client().get_model_version(cfg.name, "1").tags["git.clean"] == "true"
    capsys.readouterr()
    assert reproduce([f"models:/{cfg.name}/1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot rebuild models:/{cfg.name}/1: version 1 of {cfg.name} was made from commit "
                   f"{client().get_model_version(cfg.name, '1').tags['git.commit'][:12]}, which this repository does "
                   "not have (fetch the branch that holds it)"]

    import torch
    from safetensors.torch import load_file, save_file

    Path("tweak.py").write_text("LEARNING_RATE = 1.0\n")  # new code, not committed
    (project.report_dir("ppo")).mkdir(parents=True, exist_ok=True)
    (project.report_dir("ppo") / "samples.jsonl").write_text("{}\n")  # a report: no code
    weights = project.ppo / "model.safetensors"  # and a model it made: a new version
    torch.manual_seed(2)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    assert run(cfg, project, tiny_config("quantize"))["registered"][cfg.name]["version"] == 2
    version = client().get_model_version(cfg.name, "2")
    assert version.tags["git.clean"] == "false"
    lineage = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.name}/2/artifacts/lineage.json"))
    record = json.loads(lineage.read_text())
    assert record["git"]["uncommitted"] == ["tweak.py"] and record["git"]["clean"] is False
    capsys.readouterr()
    assert reproduce([f"models:/{cfg.name}/2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot rebuild models:/{cfg.name}/2: version 2 of {cfg.name} was made from a "
                           "working tree with uncommitted code (git.clean: false")
