"""evaluate: the HumanEval sandbox, the lm-eval task files over the real sets, and the stage on
tiny models: one table, and a recorded skip (never a lost table) for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import stages
from stages.common.config import ConfigError, Paths, load_section, read_yaml
from stages.common.sandbox import run_program
from stages.evaluate import EvaluateConfig, markdown, run, score
from tests.conftest import tiny_model

ROOT = Path(stages.__file__).resolve().parent.parent
TASK_DIR = ROOT / "configs/lm_eval"
TASKS = {"hhh_alignment": {"limit": 2}, "bigbench_arithmetic": {"limit": 2, "max_new_tokens": 4}}


def humaneval(n: int) -> list[dict]:
    lines = (ROOT / "assets/lm_eval/humaneval.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


# ---------------------------------------------------------------------------------------------
# the sandbox


def test_sandbox_passes_good_code_and_fails_bad_code() -> None:
    assert run_program("assert sum([1, 2]) == 3").outcome == "passed"
    failed = run_program("assert sum([1, 2]) == 4")
    assert not failed.passed and failed.outcome == "failed" and "AssertionError" in failed.detail


def test_sandbox_stops_an_infinite_loop_in_time() -> None:
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.outcome == "timeout" and not result.passed
    assert time.perf_counter() - started < 5


def test_sandbox_stops_a_memory_hog() -> None:
    result = run_program("blocks = [bytearray(64 * 1024 * 1024) for _ in range(64)]", memory_mb=256)
    assert result.outcome == "memory" and not result.passed


def test_sandbox_code_cannot_reach_the_network() -> None:
    """A server listens on this machine's loopback; the sandboxed program tries to send to it
    through the socket module and through the raw _socket module: nothing arrives."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]

    def accept() -> None:
        try:
            conn, _ = server.accept()
            received.append(conn.recv(100))
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'leak')\n",
                 f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'leak')\n"):
        result = run_program(code)
        assert result.outcome == "network" and not result.passed, result
    thread.join()
    server.close()
    assert received == []


def test_sandbox_code_cannot_run_commands_or_delete_files(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    for code in (f"import os\nos.remove({str(victim)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 "import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])"):
        assert not run_program(code).passed, code
    assert victim.read_text() == "still here"


def test_humaneval_scores_the_reference_solutions_as_passing_and_a_wrong_one_as_failing() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("humaneval_utils", TASK_DIR / "humaneval_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    problems = humaneval(3)
    assert len(problems) == 3
    for doc in problems:
        assert utils.process_results(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}, doc["task_id"]
        assert utils.process_results(doc, ["    return None\n"]) == {"pass@1": 0.0}, doc["task_id"]
    loop = utils.process_results(problems[0], ["    while True:\n        pass\n"])
    assert loop == {"pass@1": 0.0}


# ---------------------------------------------------------------------------------------------
# the task files


def test_every_task_file_loads_its_local_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    manager = TaskManager(include_path=str(TASK_DIR))
    params = load_section(EvaluateConfig, "evaluate", read_yaml(ROOT / "params.yaml"))
    for name in params.tasks:
        task = manager.load([name])["tasks"][name]
        docs = list(task.eval_docs)
        assert len(docs) > 100, name
        # the gold answer is one of the choices / a non-empty target on every record
        if task.OUTPUT_TYPE == "multiple_choice":
            assert all(0 <= task.doc_to_target(d) < len(task.doc_to_choice(d)) for d in docs), name
        else:
            assert all(str(task.doc_to_target(d)).strip() for d in docs), name


def test_score_reads_the_declared_metric_not_its_stderr_or_sample_count() -> None:
    out = {"results": {"t": {"alias": "t", "sample_len": 4, "acc_stderr,none": 0.2, "acc,none": 0.75}},
           "higher_is_better": {"t": {"acc": True}}}
    assert score(out, "t") == ("acc", 0.75)
    assert score({"results": {}}, "t") is None


def test_markdown_marks_skipped_cells() -> None:
    text = markdown({"base": {"perplexity": 12.345, "hhh_alignment": 0.5}}, ["perplexity", "hhh_alignment", "x"],
                    {"perplexity": "token perplexity", "hhh_alignment": "acc"}, {"x": "no task named 'x'"})
    assert "| base | 12.35 | 0.500 | skipped |" in text and "- `x`: no task named 'x'" in text


def test_contamination_finds_an_evaluation_item_in_the_training_data(tiny_workdir: Paths,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    from stages.common.io import read_records, write_records
    from stages.evaluate import contamination, item_text, training_ngrams

    monkeypatch.chdir(ROOT)
    task = TaskManager(include_path=str(TASK_DIR)).load(["hhh_alignment"])
    cfg = EvaluateConfig(task_dir=TASK_DIR, tasks={"hhh_alignment": {"limit": 3}})
    clean = contamination({"hhh_alignment": task["tasks"]}, cfg, set())
    assert clean == {"hhh_alignment": {"checked": 3, "seen": 0}}
    # the second item's preferred answer, reworded only in case and punctuation, as SFT data
    doc = list(task["tasks"]["hhh_alignment"].eval_docs)[1]
    answer = doc["choices"][doc["gold"]].upper().replace(",", " ;")
    records = read_records(tiny_workdir.dedup, "instructions")
    records.append({"id": "leak", "source": "test", "messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": answer}]})
    write_records(tiny_workdir.dedup, "instructions", records)
    assert len(answer.split()) >= 13, item_text(task["tasks"]["hhh_alignment"], doc)
    seen = contamination({"hhh_alignment": task["tasks"]}, cfg, training_ngrams(tiny_workdir, 13))
    assert seen["hhh_alignment"]["seen"] >= 1


def test_unknown_model_stage_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="evaluate.models"):
        load_section(EvaluateConfig, "evaluate", {"evaluate": {"models": ["base", "reward"]}})


# ---------------------------------------------------------------------------------------------
# the stage on tiny models


def model_folders(paths: Paths, broken: str | None = None) -> None:
    """base, pretrain, sft, ppo: the tiny random base with the tiny tokenizer (the scores do
    not matter here, the table does); `broken` gets a config.json that does not parse."""
    for stage in ("pretrain", "sft", "ppo"):
        tiny_model(paths, getattr(paths, stage))
    if broken:
        (getattr(paths, broken) / "config.json").write_text("{ not json")


def test_stage_writes_the_table_chart_and_results(tiny_workdir: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    model_folders(tiny_workdir)
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the project
    cfg = EvaluateConfig(models=["base", "ppo", "quantized"], task_dir=TASK_DIR, tasks=TASKS, perplexity_blocks=2)
    metrics = run(cfg, tiny_workdir)
    report = tiny_workdir.report_dir("evaluate")
    assert set(metrics["models"]) == {"base", "ppo"}  # no quantized folder: no quantized rows
    for row in metrics["models"].values():
        assert set(row) == {"perplexity", "hhh_alignment", "bigbench_arithmetic"}
        assert row["perplexity"] > 1 and 0 <= row["hhh_alignment"] <= 1
    assert metrics["metric"] == {"perplexity": "token perplexity", "hhh_alignment": "acc",
                                 "bigbench_arithmetic": "exact_match"}
    assert metrics["skipped"] == {} and metrics["cells_skipped"] == 0
    assert (report / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ppo |" in (report / "table.md").read_text()
    assert "hhh_alignment" in json.loads((report / "results/ppo.json").read_text())["results"]


def test_bad_task_files_and_a_broken_model_are_recorded_skips(tiny_workdir: Paths, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model_folders(tiny_workdir, broken="sft")
    quantized = tiny_workdir.quantized / "int8"  # a quantized folder that is not a model
    quantized.mkdir(parents=True)
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task_dir)
    # data that is not there, and a YAML that does not parse
    (task_dir / "hhh_alignment.yaml").write_text(
        (TASK_DIR / "hhh_alignment.yaml").read_text().replace("hhh_alignment.jsonl", "missing.jsonl"))
    (task_dir / "truthful_qa_mc.yaml").write_text("task: truthful_qa_mc\ndataset_path: [unclosed\n")
    monkeypatch.chdir(ROOT)
    tasks = {**TASKS, "truthful_qa_mc": {"limit": 2}, "no_such_task": {"limit": 2}}
    cfg = EvaluateConfig(models=["base", "sft", "ppo", "quantized"], task_dir=task_dir, tasks=tasks,
                         perplexity_blocks=2)
    metrics = run(cfg, tiny_workdir)
    skipped = metrics["skipped"]
    assert set(metrics["models"]) == {"base", "ppo"}
    assert "config.json" in skipped["sft"] or "does not load" in skipped["sft"]
    assert "no config.json" in skipped["quantized/int8"]
    assert "does not load" in skipped["hhh_alignment"]
    assert "truthful_qa_mc" in skipped and "no_such_task" in skipped
    # the good task still ran on every model that loads
    for row in ("base", "ppo"):
        assert set(metrics["models"][row]) == {"perplexity", "bigbench_arithmetic"}
    table = (tiny_workdir.report_dir("evaluate") / "table.md").read_text()
    assert "| sft |" not in table and "- `sft`:" in table
