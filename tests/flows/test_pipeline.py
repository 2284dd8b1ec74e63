"""End to end: the tiny profile through the Prefect flow, DVC and MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from stages.common import sandbox
from stages.common.config import read_yaml
from tests.conftest import ROOT, make_project, run_in

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
    quarantine = pq.read_table(tiny_project / "data/quarantine/corpus").to_pylist()  # a folder of shards
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
    assert {"pretrain", "sft", "reward", "ppo", "dpo"} <= set(training)
    for stage in training:
        assert metrics(tiny_project, stage)["resumed_from_step"] == 0, stage
        assert (tiny_project / "reports" / stage / "curves.csv").exists(), stage
        assert not (tiny_project / "checkpoints" / stage).exists(), stage  # removed after success
    for folder in ("models/pretrain", "models/sft", "models/ppo", "models/dpo"):
        AutoModelForCausalLM.from_pretrained(tiny_project / folder)
    for scorer in ("models/reward", "models/judge"):  # the proxy and the judge
        AutoModelForSequenceClassification.from_pretrained(tiny_project / scorer)
    assert (tiny_project / "reports/ppo/samples.jsonl").read_text().strip()


def test_evaluation_table_covers_every_model_and_compares_with_dvc(tiny_project: Path) -> None:
    table = metrics(tiny_project, "evaluate")
    quantized = {f"quantized/{m}" for m in metrics(tiny_project, "quantize")["methods"]}
    code = [] if sandbox.unavailable() else ["humaneval_sandbox"]
    assert quantized and set(table["models"]) == {"base", "pretrain", "sft", "dpo", "ppo", *quantized, "judge",
                                                  "proxy"}
    for row, scores in table["models"].items():
        expected = {"pairwise_accuracy"} if row in ("judge", "proxy") else {
            "perplexity", "instruction_loss", "judge_score", "proxy_reward", "hhh_alignment", "truthful_qa_mc",
            "bigbench_arithmetic", *code}
        assert set(scores) == expected, row
        assert set(table["stderr"][row]) == expected, row  # every cell has its error
    # HumanEval's programs run only in a sandbox: without bubblewrap its cells are skipped
    assert set(table["skipped"]) == (set() if code else {"humaneval_sandbox"})
    # each row against the one before it; a quantized row against the model it was made from
    assert table["comparisons"]["sft"]["against"] == "pretrain"
    assert table["comparisons"]["ppo"]["against"] == "sft" and "judge_win_rate" in table["comparisons"]["ppo"]
    assert {table["comparisons"][q]["against"] for q in quantized} == {"ppo"}
    assert table["contamination"]["hhh_alignment"]["seen"] == 0  # decontam and the split held
    # DVC reads the table as metrics, so `dvc metrics diff` compares two commits' tables
    shown = json.loads(run_in(tiny_project, "-m", "dvc", "metrics", "show", "--json").stdout)
    (revision,) = shown.values()  # the workspace (this scratch project has no git history)
    dvc_table = revision["data"]["reports/evaluate/metrics.json"]["data"]
    assert dvc_table["models"]["ppo"] == table["models"]["ppo"]
    assert (tiny_project / "reports/evaluate/chart.png").stat().st_size > 1000


def test_final_and_quantized_models_are_registered_and_load_by_alias(tiny_project: Path) -> None:
    import mlflow

    from stages.common.lm import greedy, load_causal_lm, load_tokenizer

    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    registered = metrics(tiny_project, "register")["registered"]
    methods = metrics(tiny_project, "quantize")["methods"]
    assert set(registered) == {"llm-forge", *(f"llm-forge-{m}" for m in methods)}
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("llm-forge", "candidate")
    tags = version.tags
    assert tags["llm_forge.lineage"] == "verified"  # the folder is the one dvc.lock records
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"]
    assert tags["llm_forge.model_md5"] == next(o["md5"] for o in lock["ppo"]["outs"] if o["path"] == "models/ppo")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tiny_project, capture_output=True, text=True).stdout
    assert tags["git.commit"] == head.strip() and tags["git.clean"] == "true"  # the run's records are no code
    assert tags["eval.verdict"].startswith("against sft: ")
    assert len(tags) <= 10  # a handful: the version's page reads in a few lines
    # the pipeline run lists every registered model as its output
    (parent,) = client.search_runs([client.get_experiment_by_name("llm-forge").experiment_id],
                                   "attributes.run_name = 'pipeline'")
    logged = {o.model_id for o in parent.outputs.model_outputs}
    assert {client.get_model_version_by_alias(name, "candidate").source.removeprefix("models:/")
            for name in registered} == logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/llm-forge@candidate")
    chat = [{"role": "user", "content": "hello"}]
    folder = tiny_project / "models/ppo"
    # the registry answers a chat as the pipeline's own generator answers it from the folder
    expected = greedy(load_causal_lm(folder), load_tokenizer(folder), [chat], 4)
    assert model.predict([chat], params={"max_new_tokens": 4}) == expected


# --- the parent run's headline figures (unit level: no pipeline runs) ---------------------------

EVALUATION = {
    "models": {"base": {"perplexity": 900.5, "hhh_alignment": 0.25},
               "quantized/nf4": {"perplexity": 640.0, "hhh_alignment": 0.5}},
    "stderr": {"base": {"perplexity": 12.0, "hhh_alignment": 0.05},
               "quantized/nf4": {"perplexity": 9.5, "hhh_alignment": None}},
    "skipped": {}, "cells": 4, "metric": {"hhh_alignment": "acc"},
}


def test_the_evaluation_table_becomes_one_metric_per_cell() -> None:
    from flows.pipeline import evaluation_metrics

    assert evaluation_metrics(EVALUATION) == {
        "base.perplexity": 900.5, "base.hhh_alignment": 0.25,
        "quantized/nf4.perplexity": 640.0, "quantized/nf4.hhh_alignment": 0.5,
        "base.perplexity.stderr": 12.0, "base.hhh_alignment.stderr": 0.05,
        "quantized/nf4.perplexity.stderr": 9.5,  # a missing error is no metric, not a zero
    }
    # a table without standard errors still gives its scores
    assert evaluation_metrics({"models": {"sft": {"perplexity": 3.0}}}) == {"sft.perplexity": 3.0}


def headline_project(root: Path) -> Path:
    """A project folder with a params file and the reports of clean and evaluate."""
    from stages.common.config import Paths

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {k: f"out/{k}" for k in Paths.model_fields}}))
    for stage, report in (("clean", {"docs_in": 10, "docs_out": 8, "dropped": {"short": 2}, "near": True}),
                          ("evaluate", EVALUATION)):
        (root / "out/reports" / stage).mkdir(parents=True)
        (root / "out/reports" / stage / "metrics.json").write_text(json.dumps(report))
    return root


def test_the_parent_run_gets_the_headline_figures(tmp_path: Path) -> None:
    import mlflow

    from flows.pipeline import evaluation_metrics, log_headline

    root = headline_project(tmp_path / "project")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(run_name="pipeline") as run:
        # sft ran but wrote no report: it adds nothing and stops nothing
        logged = log_headline(["clean", "sft", "evaluate"], read_yaml(root / "params.yaml"), root)
    stored = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert stored == logged
    assert stored["quantized/nf4.perplexity"] == 640.0 and stored["base.hhh_alignment.stderr"] == 0.05
    assert evaluation_metrics(EVALUATION).items() <= stored.items()
    # each stage's top-level numbers, not its nested ones nor its flags
    assert {k: v for k, v in stored.items() if k.startswith("clean.")} == {"clean.docs_in": 10.0,
                                                                          "clean.docs_out": 8.0}
    assert stored["evaluate.cells"] == 4.0


def test_headline_figures_never_stop_the_flow(tmp_path: Path, monkeypatch) -> None:
    import socket

    import mlflow

    from flows.pipeline import evaluation_metrics, log_headline

    root = headline_project(tmp_path / "project")
    (root / "out/reports/clean/metrics.json").write_text("{not json")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as run:
        # a report that cannot be read costs that stage's figures only
        params = read_yaml(root / "params.yaml")
        assert set(log_headline(["clean", "evaluate"], params, root)) == {*evaluation_metrics(EVALUATION),
                                                                          "evaluate.cells"}
        # the store goes away before the figures are sent: a warning, no exception
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        assert log_headline(["evaluate"], params, root) == {}
        mlflow.set_tracking_uri(store)
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
    # params without readable paths cost the figures only
    with mlflow.start_run():
        assert log_headline(["evaluate"], {"paths": []}, root) == {}
    # no run to log to: none is opened
    assert log_headline(["evaluate"], params, root) == {} and mlflow.active_run() is None


def test_a_stage_that_failed_on_bad_input_is_not_retried(tmp_path: Path) -> None:
    from prefect.states import Failed

    from flows.pipeline import StageFailed, transient

    assert not transient(None, None, Failed(data=StageFailed("collect", 2)))
    assert transient(None, None, Failed(data=StageFailed("collect", 1)))  # a crash may pass next time
    assert transient(None, None, Failed(data=RuntimeError("tracking server busy")))

    # for real: a source with nothing readable is bad input (exit 2); the flow runs collect once
    project = make_project(tmp_path / "project")
    (project / "empty.txt").write_text("")
    params = yaml.safe_load((project / "params.yaml").read_text())
    source = next(s for s in params["collect"]["sources"] if s["type"] == "text")
    source["path"] = str(project / "empty.txt")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run_in(project, "-m", "flows.pipeline", "--stage", "collect", check=False)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "no readable record" in out and "bad input, not retried" in out
    assert out.count("Running stage 'collect'") == 1, out[-3000:]


def test_the_flow_published_the_evaluation_table_and_mlflow_links_as_prefect_artifacts(tiny_project: Path) -> None:
    import base64
    import sqlite3

    # the flow's temporary Prefect server kept its database in the project's PREFECT_HOME
    with sqlite3.connect(tiny_project / ".prefect/prefect.db") as db:
        found = {key: json.loads(data) if isinstance(data, str) else data
                 for key, data in db.execute("select key, data from artifact")}
    # the chart inline above the table: the Prefect UI shows markdown and nothing else
    chart = base64.b64encode((tiny_project / "reports/evaluate/chart.png").read_bytes()).decode()
    assert found["evaluation"] == (f"![chart.png](data:image/png;base64,{chart})\n\n"
                                   + (tiny_project / "reports/evaluate/table.md").read_text())
    links = found["mlflow-runs"]
    assert all(f"[{stage}](http" in links for stage in ("pipeline", "collect", "evaluate", "register")), links
    for stage in ("clean", "decontam", "dedup", "tokenize"):  # each data stage's progress bar, full at the end
        assert float(found[f"progress-{stage}"]) == 100.0, stage
