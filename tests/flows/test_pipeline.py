"""End to end: the tiny profile through the Prefect flow, DVC and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import ROOT, run_in

# The graph's stages, from the one place that lists them.
ALL_STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "reports" / stage / "metrics.json").read_text())


def test_every_stage_ran_and_accounts_for_every_record(tiny_project: Path) -> None:
    counted = [stage for stage in ALL_STAGES if "docs_in" in metrics(tiny_project, stage)]
    assert {"collect", "clean", "dedup", "tokenize", "sft", "reward"} <= set(counted)
    for stage in counted:
        m = metrics(tiny_project, stage)
        assert m["docs_in"] == m["docs_out"] + sum(m["dropped"].values()), stage
    # what one stage let out is what the next took in
    assert metrics(tiny_project, "collect")["docs_out"] == metrics(tiny_project, "clean")["docs_in"]
    assert metrics(tiny_project, "clean")["docs_out"] == metrics(tiny_project, "dedup")["docs_in"]
    assert metrics(tiny_project, "dedup")["kinds"]["corpus"]["docs_out"] == metrics(tiny_project, "tokenize")["docs_in"]
    # the tiny profile really is tiny, and really ran
    assert 100 <= metrics(tiny_project, "collect")["kinds"]["corpus"]["docs_out"] <= 400
    assert metrics(tiny_project, "tokenize")["train"]["blocks"] > 10
    assert metrics(tiny_project, "base")["source"] == "from_scratch"


def test_outputs_open_with_standard_tools(tiny_project: Path) -> None:
    import datasets
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = datasets.load_from_disk(str(tiny_project / "data/tokenized"))
    assert set(ds) == {"train", "val"} and len(ds["val"]) > 0
    tok = AutoTokenizer.from_pretrained(tiny_project / "data/tokenized/tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_project / "models/base")
    assert len(tok) <= model.config.vocab_size
    quarantine = pq.read_table(tiny_project / "data/quarantine/corpus.parquet").to_pylist()
    assert all(q["reason"] for q in quarantine)


def test_dvc_repro_right_after_does_nothing(tiny_project: Path) -> None:
    status = run_in(tiny_project, "-m", "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    again = run_in(tiny_project, "-m", "dvc", "repro")
    assert "Running stage" not in again.stdout, again.stdout


def test_mlflow_has_one_parent_and_a_nested_run_per_stage(tiny_project: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm-forge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(ALL_STAGES)
    clean = children["clean"]
    assert clean.data.metrics["docs_in"] > 0 and clean.data.params["max_chars"] == "1000000"
    assert any(k.startswith("dvc.outs.") for k in clean.data.tags)
    artifacts = {a.path for a in client.list_artifacts(clean.info.run_id, "clean")}
    assert {"clean/metrics.json", "clean/samples_dropped.jsonl", "clean/samples_kept.jsonl"} <= artifacts
    validate = {a.path for a in client.list_artifacts(children["validate"].info.run_id, "validate")}
    assert "validate/report.json" in validate


def test_a_failed_expectation_stops_the_pipeline(tiny_project: Path, tmp_path: Path) -> None:
    import yaml

    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["validate"]["languages"] = {"en": [0.99, 1.0]}
    params["paths"]["reports"] = str(tmp_path / "reports")  # leave the shared project's reports alone
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    done = run_in(tiny_project, "-m", "stages.validate", "--params", str(bad), "--no-mlflow", check=False)
    assert done.returncode == 2
    assert "expectations failed" in done.stderr and "'column': 'lang'" in done.stderr


def test_training_stages_ran_fresh_and_left_loadable_models(tiny_project: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    training = [stage for stage in ALL_STAGES if "resumed_from_step" in metrics(tiny_project, stage)]
    assert {"pretrain", "sft", "reward", "ppo"} <= set(training)
    for stage in training:
        assert metrics(tiny_project, stage)["resumed_from_step"] == 0, stage
        assert (tiny_project / "reports" / stage / "curves.csv").exists(), stage
        assert not (tiny_project / "checkpoints" / stage).exists(), stage  # removed after success
    for folder in ("models/pretrain", "models/sft", "models/ppo"):
        AutoModelForCausalLM.from_pretrained(tiny_project / folder)
    AutoModelForSequenceClassification.from_pretrained(tiny_project / "models/reward")
    assert (tiny_project / "reports/ppo/samples.jsonl").read_text().strip()


def test_evaluation_table_covers_every_model_and_compares_with_dvc(tiny_project: Path) -> None:
    table = metrics(tiny_project, "evaluate")
    quantized = {f"quantized/{m}" for m in metrics(tiny_project, "quantize")["methods"]}
    assert quantized and set(table["models"]) == {"base", "pretrain", "sft", "ppo", *quantized}
    for row, scores in table["models"].items():
        assert set(scores) == {"perplexity", "hhh_alignment", "truthful_qa_mc", "bigbench_arithmetic",
                               "humaneval_sandbox"}, row
    assert table["skipped"] == {}
    # DVC reads the table as metrics, so `dvc metrics diff` compares two commits' tables
    shown = json.loads(run_in(tiny_project, "-m", "dvc", "metrics", "show", "--json").stdout)
    (revision,) = shown.values()  # the workspace (this scratch project has no git history)
    dvc_table = revision["data"]["reports/evaluate/metrics.json"]["data"]
    assert dvc_table["models"]["ppo"] == table["models"]["ppo"]
    assert (tiny_project / "reports/evaluate/chart.png").stat().st_size > 1000


def test_final_and_quantized_models_are_registered_and_load_by_alias(tiny_project: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    registered = metrics(tiny_project, "register")["registered"]
    methods = metrics(tiny_project, "quantize")["methods"]
    assert set(registered) == {"llm-forge", *(f"llm-forge-{m}" for m in methods)}
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("llm-forge", "candidate")
    tags = version.tags
    assert tags["llm_forge.lineage_verified"] == "true"  # the folder is the one dvc.lock records
    assert tags["dvc.ppo.outs.models/ppo"] == tags["llm_forge.model_md5"]
    assert "dvc.collect.outs.data/raw" in tags and "eval.hhh_alignment" in tags
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/llm-forge@candidate")
    assert model.predict(["Human: hello\nAssistant:"], params={"max_new_tokens": 4})[0].strip()
