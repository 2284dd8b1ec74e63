"""validate: a Great Expectations suite passes clean data and names what fails."""

from __future__ import annotations

import json

import pytest

from stages.common.config import Paths, StageError
from stages.common.io import write_records
from stages.validate import ValidateConfig, run

CFG = ValidateConfig(languages={"en": (0.4, 1.0), "zh": (0.0, 0.5)}, min_chars=5)


def corpus(extra: list[dict] | None = None) -> list[dict]:
    docs = [{"id": f"en{i}", "source": "s", "text": f"An English document number {i}, reporting <EMAIL>.", "lang": "en"}
            for i in range(8)]
    docs += [{"id": "zh0", "source": "s", "text": "这是一个中文文件，内容很短。", "lang": "zh"}]
    return docs + (extra or [])


def write(paths: Paths, docs: list[dict]) -> None:
    write_records(paths.dedup, "corpus", docs)
    write_records(paths.dedup, "instructions", [
        {"id": "i1", "source": "s", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    write_records(paths.dedup, "preferences", [{"id": "p1", "source": "s", "prompt": "Q", "chosen": "A", "rejected": "B"}])


def test_clean_data_passes_and_reports(paths: Paths) -> None:
    write(paths, corpus())
    m = run(CFG, paths)
    assert m["success"] and m["rows"] == {"corpus": 9, "instructions": 1, "preferences": 1} and m["expectations"] > 20
    report = json.loads((paths.reports / "validate/report.json").read_text())
    assert report["corpus"]["success"] is True


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
        run(CFG, paths)
    assert "FAILED" in (paths.reports / "validate/summary.md").read_text()


def test_language_mix_out_of_bounds(paths: Paths) -> None:
    zh = [{"id": f"zh{i}", "source": "s", "text": "这是另一个中文文件，内容也很短。", "lang": "zh"} for i in range(1, 9)]
    write(paths, corpus(zh))
    with pytest.raises(StageError, match=r"expect_column_values_to_not_be_in_set\(\{'column': 'lang'.*'zh'"):
        run(CFG, paths)
