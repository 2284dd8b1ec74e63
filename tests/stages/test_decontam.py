"""decontam: a training record that shares a run of tokens with an evaluation item goes to quarantine,
named by its benchmark, from each of the three training sets; everything else passes untouched."""

from __future__ import annotations

from pathlib import Path

from stages.common.benchmarks import ngrams, tokens
from stages.common.config import Paths, load_section
from stages.common.io import read_records, write_jsonl, write_records
from stages.decontam import DecontamConfig, run
from stages.evaluate import EvaluateConfig
from tests.conftest import tiny_config, tiny_params

QUESTION = "Which ocean current carries warm water from the Gulf of Mexico across the Atlantic toward northern Europe?"
ANSWER = "The Gulf Stream"
CHINESE = "长江是亚洲第一长河也是世界第三长河发源于青藏高原"  # a Chinese item: each character is a token
FILLER = ("The committee met on Tuesday to review the budget for the coming year and agreed to publish "
          "the minutes before the end of the month so that members could comment on them. ")


def quiz(task_dir: Path) -> str:
    """A two-item multiple-choice task, one English and one Chinese item."""
    data = task_dir / "quiz.jsonl"
    write_jsonl(data, [{"id": "en", "q": QUESTION, "choices": [ANSWER, "The Humboldt Current"], "gold": 0},
                       {"id": "zh", "q": CHINESE, "choices": ["对", "错"], "gold": 0}])
    (task_dir / "quiz.yaml").write_text(
        f"task: quiz\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n")
    return "quiz"


def evaluate_config(task_dir: Path, holdout: dict | None = None, **tasks: dict) -> EvaluateConfig:
    section = {**tiny_params()["evaluate"], "task_dir": str(task_dir), **({"holdout": holdout} if holdout else {}),
               "tasks": {name: {"limit": None, "max_new_tokens": None, "holdout": False, **t}
                         for name, t in tasks.items()}}
    return load_section(EvaluateConfig, "evaluate", {"evaluate": section})


def chat(question: str, answer: str, rid: str) -> dict:
    return {"id": rid, "source": "test", "messages": [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": answer}]}


def test_a_planted_item_is_removed_from_each_training_set_and_quarantined_with_its_benchmark(
        paths: Paths, tmp_path: Path) -> None:
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    quiz(task_dir)
    cut = " ".join(QUESTION.split()[:12])  # 12 words of the item: one short of a run
    write_records(paths.clean, "corpus", [
        {"id": "article", "source": "test", "text": FILLER + QUESTION.upper().replace(" ", "  ") + " " + FILLER,
         "lang": "en"},
        {"id": "near_miss", "source": "test", "text": FILLER + cut + " and then something else entirely.",
         "lang": "en"},
        {"id": "chinese", "source": "test", "text": "新华社北京电。" + CHINESE + "。全长六千三百公里。", "lang": "zh"},
        {"id": "plain", "source": "test", "text": FILLER * 3, "lang": "en"}])
    write_records(paths.clean, "instructions", [chat("Where does warm Atlantic water come from?", QUESTION, "leak"),
                                                chat("Summarize the meeting.", FILLER, "ok")])
    write_records(paths.clean, "preferences", [
        {"id": "leak", "source": "test", "prompt": QUESTION, "chosen": ANSWER, "rejected": "No idea."},
        {"id": "ok", "source": "test", "prompt": "Say hello.", "chosen": "Hello!", "rejected": "Go away."}])

    metrics = run(DecontamConfig(samples=10), paths, evaluate_config(task_dir, quiz={}), tiny_config("data"))

    assert len(tokens(CHINESE)) >= 13 and not ngrams(cut, 13)
    assert metrics["kinds"]["corpus"]["dropped"] == {"overlaps_quiz": 2}
    assert metrics["kinds"]["instructions"]["dropped"] == {"overlaps_quiz": 1}
    assert metrics["kinds"]["preferences"]["dropped"] == {"overlaps_quiz": 1}
    assert {r["id"] for r in read_records(paths.decontam, "corpus")} == {"near_miss", "plain"}
    assert [r["id"] for r in read_records(paths.decontam, "instructions")] == ["ok"]
    assert [r["id"] for r in read_records(paths.decontam, "preferences")] == ["ok"]
    assert read_records(paths.decontam, "corpus")[0]["lang"] == "en"  # the schema passes through
    quarantined = {kind: read_records(paths.contaminated, kind)
                   for kind in ("corpus", "instructions", "preferences")}
    by_id = {r["id"]: r for r in quarantined["corpus"]}
    assert by_id["article"]["reason"] == "overlaps_quiz" and "quiz/en" in by_id["article"]["detail"]
    assert "quiz/zh" in by_id["chinese"]["detail"]
    assert quarantined["instructions"][0]["id"] == "leak" and QUESTION in quarantined["instructions"][0]["record"]
    assert quarantined["preferences"][0]["id"] == "leak"
    assert metrics["eval_items"] == {"quiz": 2} and metrics["unchecked_items"] == {"quiz": 0}


def test_a_held_out_task_guards_only_its_evaluation_part(paths: Paths, tmp_path: Path) -> None:
    """With `holdout`, the items kept for training may be trained on; the others may not."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    quiz(task_dir)
    cfg = evaluate_config(task_dir, quiz={"holdout": True}, holdout={"key": "q", "salt": "s", "eval_fraction": 0.5})
    scored = {i for i, q in (("en", QUESTION), ("zh", CHINESE)) if cfg.holdout.for_evaluation({"q": q})}
    write_records(paths.clean, "corpus", [{"id": "en", "source": "t", "text": QUESTION + " " + ANSWER, "lang": "en"},
                                          {"id": "zh", "source": "t", "text": CHINESE, "lang": "zh"}])
    metrics = run(DecontamConfig(samples=0), paths, cfg, tiny_config("data"))
    assert {r["id"] for r in read_records(paths.decontam, "corpus")} == {"en", "zh"} - scored
    assert metrics["eval_items"] == {"quiz": len(scored)}


def test_a_missing_evaluation_set_is_a_recorded_skip(paths: Paths, tmp_path: Path) -> None:
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    quiz(task_dir)
    (task_dir / "gone.yaml").write_text((task_dir / "quiz.yaml").read_text().replace("quiz", "gone")
                                        .replace("gone.jsonl", "missing.jsonl"))
    write_records(paths.clean, "corpus", [{"id": "a", "source": "t", "text": QUESTION, "lang": "en"}])
    metrics = run(DecontamConfig(samples=0), paths, evaluate_config(task_dir, quiz={}, gone={}, nothing={}),
                  tiny_config("data"))
    assert set(metrics["skipped"]) == {"gone", "nothing"} and "does not load" in metrics["skipped"]["gone"]
    assert metrics["dropped"] == {"overlaps_quiz": 1}
