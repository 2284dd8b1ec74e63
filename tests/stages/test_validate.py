"""validate: a Great Expectations suite passes clean data and names what fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.common.config import Paths, StageError
from stages.common.io import write_records
from stages.validate import main, run
from tests.conftest import tiny_config, tiny_params

CFG = tiny_config("validate", languages={"en": (0.4, 1.0), "zh": (0.0, 0.5)}, min_chars=5, min_docs=5)
CLEAN = tiny_config("clean")  # validate checks clean's limit
DATA = tiny_config("data")


def corpus(extra: list[dict] | None = None) -> list[dict]:
    docs = [{"id": f"en{i}", "source": "s", "text": f"An English document number {i}, reporting <EMAIL>.", "lang": "en"}
            for i in range(8)]
    docs += [{"id": "zh0", "source": "s", "text": "这是一个中文文件，内容很短。", "lang": "zh"}]
    return docs + (extra or [])


def write(paths: Paths, docs: list[dict]) -> None:
    write_records(paths.dedup, "corpus", docs)
    write_records(paths.dedup, "instructions", [
        {"id": "i1", "source": "s",
         "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    write_records(paths.dedup, "preferences",
                  [{"id": "p1", "source": "s", "prompt": "Q", "chosen": "A", "rejected": "B", "split": "reward"}])


def test_clean_data_passes_and_reports(paths: Paths) -> None:
    write(paths, corpus())
    m = run(CFG, paths, CLEAN, DATA)
    assert m["success"] and m["rows"] == {"corpus": 9, "instructions": 1, "preferences": 1} and m["expectations"] > 20
    report = json.loads((paths.reports / "validate/report.json").read_text())
    assert report["corpus"]["success"] is True


def test_shards_merge_into_one_verdict(paths: Paths) -> None:
    """Each shard is its own batch; ids repeated across shards, and a language share that only
    the whole corpus breaks, still fail."""
    docs = corpus()
    for shard in range(3):
        write_records(paths.dedup, "corpus", docs[shard::3], index=shard)
    write(paths, docs[:0])  # the other kinds; corpus written above, shard by shard
    for shard in range(3):
        write_records(paths.dedup, "corpus", docs[shard::3], index=shard)
    m = run(CFG, paths, CLEAN, tiny_config("data", workers=2))
    assert m["success"] and m["shards"] == 5 and m["rows"]["corpus"] == 9
    write_records(paths.dedup, "corpus", [{**docs[1], "text": "Another text under an id shard 1 holds."}], index=3)
    with pytest.raises(StageError, match=r"expect_column_values_to_be_unique\(\{'column': 'id'\}\) -> 2 unexpected"):
        run(CFG, paths, CLEAN, DATA)
    # zh at most 0.5 of the corpus, counted over all shards: a shard of zh alone passes with the rest
    zh = [{"id": f"zh{i}", "source": "s", "text": "这是另一个中文文件。", "lang": "zh"} for i in range(1, 9)]
    write_records(paths.dedup, "corpus", zh[:6], index=3)
    assert run(CFG, paths, CLEAN, DATA)["success"]  # 7 of 15 zh
    write_records(paths.dedup, "corpus", zh, index=3)  # 9 of 17
    with pytest.raises(StageError, match=r"expect_column_values_to_not_be_in_set\(\{'column': 'lang'"):
        run(CFG, paths, CLEAN, DATA)


@pytest.mark.parametrize("bad, expected", [
    ({"id": "en0", "source": "s", "text": "A second document with an id already used.", "lang": "en"},
     r"corpus: expect_column_values_to_be_unique\(\{'column': 'id'\}\)"),
    ({"id": "x", "source": "s", "text": "Write to jane.roe@example.org for details.", "lang": "en"},
     r"expect_column_values_to_not_match_regex.*1 unexpected, e\.g\. 'Write to jane"),
    ({"id": "x", "source": "s", "text": "tiny", "lang": "en"}, r"expect_column_value_lengths_to_be_between"),
    ({"id": "x", "source": "s", "text": "Ein deutsches Dokument, das hier fehl am Platz ist.", "lang": "de"},
     r"expect_column_values_to_be_in_set\(\{'column': 'lang', 'value_set': \['en', 'zh'\]"),
])
def test_each_failed_expectation_is_named(paths: Paths, bad: dict, expected: str) -> None:
    write(paths, corpus([bad]))
    with pytest.raises(StageError, match=expected):
        run(CFG, paths, CLEAN, DATA)
    assert "FAILED" in (paths.reports / "validate/summary.md").read_text()


def test_language_mix_out_of_bounds(paths: Paths) -> None:
    text = "这是另一个中文文件，内容也很短。"
    zh = [{"id": f"zh{i}", "source": "s", "text": text, "lang": "zh"} for i in range(1, 9)]
    write(paths, corpus(zh))
    with pytest.raises(StageError, match=r"expect_column_values_to_not_be_in_set\(\{'column': 'lang'.*'zh'"):
        run(CFG, paths, CLEAN, DATA)


def test_too_few_documents(paths: Paths) -> None:
    write(paths, corpus()[:4])
    with pytest.raises(StageError, match=r"expect_table_row_count_to_be_between\(\{'min_value': 5\}\)"):
        run(CFG, paths, CLEAN, DATA)


def test_longest_document_is_clean_max_chars(tmp_path: Path, paths: Paths) -> None:
    """The command line reads the length limit from the params file's clean section."""
    write(paths, corpus())
    params = tmp_path / "params.yaml"
    sections = {"paths": json.loads(paths.model_dump_json()), "validate": CFG.model_dump(mode="json"),
                "clean": tiny_params()["clean"], "data": tiny_params()["data"]}
    params.write_text(yaml.safe_dump(sections))
    assert main(["--params", str(params), "--no-mlflow"]) == 0
    sections["clean"] = {**sections["clean"], "max_chars": 40}  # shorter than the English documents
    params.write_text(yaml.safe_dump(sections))
    assert main(["--params", str(params), "--no-mlflow"]) == 2
    # the failed run's report is beside the passing run's, which stays in place (stages.common.runner)
    assert json.loads((paths.reports / "validate/metrics.json").read_text())["success"]
    summary = (paths.reports / ".validate.partial/summary.md").read_text()
    assert "FAILED corpus: expect_column_value_lengths_to_be_between" in summary and "'max_value': 40" in summary
