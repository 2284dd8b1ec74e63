"""Promise: secrets never leak. Credentials given by environment (hub token, tracking-server
login, S3 keys) appear in no output of a pipeline run, and PII and secrets in the data are
redacted before any stage after `clean` sees them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stages.common.config import Paths
from stages.common.io import read_records
from stages.common.profile import apply
from stages.common.runner import run_in_process
from stages.common.tracking import flatten, scrub
from tests.conftest import CANARIES, ROOT, read_yaml

# --- credentials in the environment ----------------------------------------------------------


def test_no_output_of_a_pipeline_run_holds_a_credential(tiny_project: Path) -> None:
    """tiny_project ran the whole pipeline with CANARIES in its environment: search every byte
    it wrote (MLflow's database and artifacts, reports, dvc.lock and .dvc/, data, models, the
    Prefect database and logs, and the flow's own output)."""
    canaries = {name: value.encode() for name, value in CANARIES.items()}
    files = [p for p in tiny_project.rglob("*") if p.is_file() and not p.is_symlink()
             and "assets" not in p.relative_to(tiny_project).parts[:1]]
    files.append(tiny_project.parent / "flow.log")
    searched = {top: 0 for top in ("mlflow.db", "artifacts", "reports", "dvc.lock", ".dvc", "data", "models",
                                   ".prefect", "flow.log")}
    # MLflow's artifact store: mlartifacts/ by default, mlruns/ when MLFLOW_TRACKING_URI names a database
    artifact_roots = {"mlruns", "mlartifacts"}
    found = []
    for path in files:
        data = path.read_bytes()
        rel = path.relative_to(tiny_project.parent)
        top = rel.parts[1] if rel.parts[0] == tiny_project.name else rel.parts[0]
        top = "artifacts" if top in artifact_roots else top
        if top in searched:
            searched[top] += 1
        found += [f"{name} in {rel}" for name, value in canaries.items() if value in data]
    assert not found, found
    assert all(searched.values()), searched  # every kind of output was really there to search


def test_a_credential_in_a_message_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-Canary-Q9c")
    text = "GET https://alice:pw-Canary-Q9c@mlflow.example.com/api failed; token pw-Canary-Q9c"
    assert scrub(text) == "GET https://mlflow.example.com/api failed; token <MLFLOW_TRACKING_PASSWORD>"


def test_a_stage_logs_only_its_params_section_to_mlflow() -> None:
    """What a stage's run gets as params is its config section: no environment value in it."""
    params = read_yaml(ROOT / "params.yaml")
    logged = " ".join(f"{k}={v}" for k, v in flatten(params).items())
    assert not any(value in logged for value in CANARIES.values())
    assert not any(value in logged for value in os.environ.values() if len(value) >= 12 and "/" not in value)


# --- PII and secrets in the data -------------------------------------------------------------

# Each a secret or a piece of PII that `stages/common/pii.py` names, planted in documents that
# are long and clean enough to pass every filter of `clean`.
PLANTED = {
    "email": "maria.canary.lopez@example-mail.com",
    "phone": "+1 415 555 0137",
    "phone_us": "(415) 555-0199",
    "api_key": "sk-CanaryQ9cOpenKey1234567890abcdEF",
    "aws_key": "AKIAQ9CCANARY7XK2LM4",
    "github_token": "ghp_CanaryQ9cGithubToken1234567890abcdefXY",
    "slack_token": "xoxb-1234567890-CanaryQ9cSlack",
    "ipv4": "203.0.113.77",
    "bearer_token": "Bearer CanaryQ9cBearerTokenAbCdEf0123456789",
}



def planted_documents(n: int = 9) -> list[dict]:
    """Real news articles the tiny profile does not collect (lines past its limit of ABC news),
    each with every planted secret in a sentence in its middle."""
    from stages.common.config import resolve_path

    lines = resolve_path("pkg://gensim/test/test_data/lee_background.cor").read_text().splitlines()
    secrets = ", ".join(PLANTED.values())
    docs = []
    for i, line in enumerate(lines[200 : 200 + n]):
        words = line.split()
        half = len(words) // 2
        text = " ".join([*words[:half], f"The clerk can be reached at {secrets} for questions.", *words[half:]])
        docs.append({"id": f"planted-{i}", "text": text})
    return docs


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """collect -> clean -> dedup -> validate, base -> tokenize on the tiny profile in-process,
    with one more corpus source that carries every planted secret."""
    from flows.pipeline import stage_order

    root = tmp_path_factory.mktemp("planted")
    source = root / "planted.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in planted_documents()))
    apply(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml", root / "params.yaml")
    params = read_yaml(root / "params.yaml")
    params["collect"]["sources"].append({"name": "planted", "type": "jsonl", "path": str(source),
                                         "text_field": "text", "id_field": "id", "max_docs": None})
    paths = Paths(**{k: root / v for k, v in params["paths"].items()})
    run_in_process(stage_order("tokenize", ROOT), params, paths, cwd=ROOT)
    return paths


def test_planted_pii_never_reaches_a_stage_after_clean(planted_run: Paths) -> None:
    from transformers import AutoTokenizer

    raw = read_records(planted_run.raw, "corpus")
    assert all(s in " ".join(r["text"] for r in raw) for s in PLANTED.values())  # they were planted
    for folder in (planted_run.clean, planted_run.dedup):
        rows = read_records(folder, "corpus")
        planted = [r["text"] for r in rows if r["source"] == "planted"]
        assert len(planted) >= 3, folder  # the documents passed, redacted
        assert all("<EMAIL>" in t for t in planted), folder
        text = "\n".join(r["text"] for r in rows)
        leaked = [name for name, secret in PLANTED.items() if secret in text]
        assert not leaked, (folder, leaked)
        assert "<EMAIL>" in text and "<API_KEY>" in text and "<AWS_KEY>" in text

    import datasets

    tokenized = datasets.load_from_disk(str(planted_run.tokenized))
    tok = AutoTokenizer.from_pretrained(planted_run.tokenized / "tokenizer")
    decoded = "".join(tok.decode(ids) for split in tokenized.values() for ids in split["input_ids"])
    assert "<EMAIL>" in decoded  # the planted documents are in the blocks ...
    flat = decoded.replace(" ", "")
    leaked = [name for name, secret in PLANTED.items() if secret in decoded or secret.replace(" ", "") in flat]
    assert not leaked, leaked  # ... without their secrets
    assert "CanaryQ9c" not in decoded and "CanaryQ9c" not in json.dumps(tok.get_vocab())
