"""register: models into the MLflow Model Registry with lineage, loaded back by alias; no duplicates.

The final model is the tiny random-init base (weights scaled up) with the tiny tokenizer (as
`models/ppo`), the variant a torchao int8 copy of it (`models/quantized/torchao_int8`); the
evaluation table and `dvc.lock` are written here in the shapes the evaluate stage and DVC write.
One SQLite store serves the whole module (creating one takes seconds); each test registers under
a name of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stages.common import lm, tracking
from stages.common.config import ConfigError, Paths, StageError, load_section
from stages.common.generator import prompt_ids, rows_of
from stages.common.lineage import Hasher, upstream
from stages.register import RegisterConfig, eval_tags, folder_prompt, messages_of, run
from tests.conftest import tiny_config, tiny_model, tiny_params

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


def lock_entry(path: str, hasher: Hasher, root: Path) -> dict:
    return {"path": path, "hash": "md5", "md5": hasher.path(root / path)}


def write_lock(root: Path) -> dict:
    """A dvc.lock in DVC's format: base -> tokenize -> ppo -> quantize -> evaluate, plus a stage
    (`reward`) the final model does not come from."""
    h = Hasher()
    stage_file = {"path": "stages/x.py", "hash": "md5", "md5": "0c7278abc074fde0cf7b32a04058f79a", "size": 10}
    lock = {"schema": "2.0", "stages": {
        "base": {"cmd": "python -m stages.base", "deps": [stage_file],
                 "params": {"params.yaml": {"base": {"dtype": "float32"}}},
                 "outs": [lock_entry("models/base", h, root)]},
        "tokenize": {"cmd": "python -m stages.tokenize", "deps": [lock_entry("models/base", h, root)],
                     "params": {"params.yaml": {"tokenize": {"block_size": 64}}},
                     "outs": [lock_entry("data/tokenized", h, root)]},
        "reward": {"cmd": "python -m stages.reward", "deps": [lock_entry("data/dedup", h, root)],
                   "outs": [{"path": "models/reward", "hash": "md5", "md5": "1" * 32 + ".dir"}]},
        "ppo": {"cmd": "python -m stages.ppo",
                "deps": [lock_entry("data/tokenized", h, root), lock_entry("models/base", h, root)],
                "params": {"params.yaml": {"ppo": {"updates": 2, "algorithm": "ppo"}}},
                "outs": [lock_entry("models/ppo", h, root),
                         {"path": "reports/ppo/metrics.json", "hash": "md5", "md5": "2" * 32}]},
        "quantize": {"cmd": "python -m stages.quantize", "deps": [lock_entry("models/ppo", h, root)],
                     "params": {"params.yaml": {"quantize": {"methods": ["torchao_int8"]}}},
                     "outs": [lock_entry("models/quantized", h, root)]},
        "evaluate": {"cmd": "python -m stages.evaluate", "deps": [lock_entry("models/ppo", h, root)],
                     "outs": [{"path": "reports/evaluate/metrics.json", "hash": "md5", "md5": "3" * 32}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return lock


@pytest.fixture
def project(tiny_workdir: Paths, store: str, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """The tiny workdir as a project: models/ppo, models/quantized/torchao_int8, the evaluation
    table, dvc.lock and params.yaml, with the working directory at its root."""
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
    """The content hash is DVC's own md5 of a folder, so it equals the one in dvc.lock."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(folder), fs, "md5", dry_run=True)
    assert Hasher().folder(folder) == obj.hash_info.value
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(folder / "config.json"), fs, "md5", dry_run=True)
    assert Hasher().file(folder / "config.json") == obj.hash_info.value


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


def test_eval_tags_take_the_models_row_and_its_skips() -> None:
    assert eval_tags(EVALUATION, "ppo") == {"eval.perplexity": "1021.5", "eval.hhh_alignment": "0.75",
                                            "eval.skipped.humaneval_sandbox": "generation timed out"}
    assert eval_tags(EVALUATION, "quantized/nf4") == {"eval.skipped.all": "does not load"}


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
                                                                       request: pytest.FixtureRequest) -> None:
    """Through the CLI (the runner's stage run): both models, their tags, artifacts and samples."""
    import mlflow

    from stages.register import main

    cfg = config(request)
    params = yaml.safe_load(Path("params.yaml").read_text())
    Path("params.yaml").write_text(yaml.safe_dump({**params, "register": cfg.model_dump(),
                                                   "quantize": tiny_config("quantize").model_dump(mode="json")}))
    assert main([]) == 0
    metrics = json.loads((project.report_dir("register") / "metrics.json").read_text())
    variant = f"{cfg.name}-torchao_int8"
    assert metrics["models_registered"] == 2 and metrics["versions_created"] == 2 and metrics["skipped"] == {}
    assert metrics["registered"][cfg.name] == {
        "folder": "models/ppo", "source": "ppo", "version": 1, "new": True, "alias": "candidate",
        "model_md5": Hasher().folder(project.ppo), "evaluated": True}
    assert metrics["registered"][variant]["source"] == "quantized/torchao_int8"

    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    final = client().get_model_version_by_alias(cfg.name, "candidate")
    tags = final.tags
    assert str(final.version) == "1"
    assert tags["llm_forge.model_md5"] == lock["ppo"]["outs"][0]["md5"]  # the dvc.lock hash of models/ppo
    assert tags["llm_forge.lineage_verified"] == "true" and tags["llm_forge.dvc_stage"] == "ppo"
    assert tags["dvc.ppo.outs.models/ppo"] == lock["ppo"]["outs"][0]["md5"]
    assert tags["dvc.base.outs.models/base"] == lock["base"]["outs"][0]["md5"]  # the whole upstream chain
    assert tags["dvc.tokenize.outs.data/tokenized"] == lock["tokenize"]["outs"][0]["md5"]
    assert not any(k.startswith(("dvc.reward.", "dvc.quantize.", "dvc.evaluate.")) for k in tags)
    assert tags["eval.perplexity"] == "1021.5" and tags["eval.hhh_alignment"] == "0.75"
    assert tags["eval.skipped.humaneval_sandbox"] == "generation timed out"
    assert tags["llm_forge.source"] == "ppo" and tags["llm_forge.folder"] == "models/ppo"

    vtags = client().get_model_version_by_alias(variant, "candidate").tags
    assert vtags["dvc.quantize.outs.models/quantized"] == lock["quantize"]["outs"][0]["md5"]
    assert vtags["llm_forge.lineage_verified"] == "true"
    assert vtags["dvc.ppo.outs.models/ppo"] == tags["llm_forge.model_md5"]  # made from the registered final model
    assert vtags["eval.hhh_alignment"] == "0.5"

    # logged in the runner's stage run, with params.yaml, lineage and the evaluation table beside the weights
    assert client().get_run(final.run_id).info.run_name == "register"
    logged = mlflow.get_logged_model(final.source.removeprefix("models:/"))  # the version's LoggedModel
    assert logged.params["ppo.updates"] == "2" and logged.params["base.dtype"] == "float32"
    files = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(f"models:/{cfg.name}@candidate/artifacts")}
    assert {"ppo", "lineage.json", "evaluation.json", "params.yaml"} <= files  # the folder keeps its name

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
    assert v2.tags["llm_forge.lineage_verified"] == "false"  # dvc.lock still describes the old models/ppo
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
    assert tags["llm_forge.lineage"] == "none (no dvc.lock)" and not any(k.startswith("dvc.") for k in tags)

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
