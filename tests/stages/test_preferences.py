"""Bad preference input, from the source file to the reward stage: every bad pair is dropped with its
reason and counted where it is found (a missing side at collect; an empty answer or the same answer
twice at clean, kept in the quarantine; a pair past the length limit at training time), never a crash."""

from __future__ import annotations

import json
from pathlib import Path

from stages import clean, collect, reward
from stages.common.config import Paths
from stages.common.io import read_records
from stages.common.shards import DataConfig
from tests.conftest import tiny_config


def test_bad_pairs_are_dropped_with_their_reason_and_counted(paths: Paths, tmp_path: Path,
                                                            tiny_inputs: Paths) -> None:
    from transformers import AutoTokenizer

    good = {"prompt": "Is the sky blue on a clear day?", "chosen": "Yes, it is.", "rejected": "No, it is green."}
    rows = [
        good,
        {"prompt": good["prompt"], "rejected": "No."},                              # no chosen answer
        {"prompt": good["prompt"], "chosen": "Yes.", "rejected": None},             # a null rejected answer
        {"chosen": "Yes.", "rejected": "No."},                                      # no prompt at all
        {"prompt": good["prompt"], "chosen": 42, "rejected": "No."},                # not text
        {"prompt": good["prompt"], "chosen": "", "rejected": "No."},                # empty
        {"prompt": good["prompt"], "chosen": "Yes.", "rejected": " \n "},           # blank
        {"prompt": good["prompt"], "chosen": "Yes.", "rejected": "Yes."},           # the same answer twice
        {"prompt": good["prompt"], "chosen": "Yes. ", "rejected": " Yes."},         # the same, but for spaces
        {"prompt": "word " * 400 + "?", "chosen": "Yes.", "rejected": "No."},       # past reward.max_length
        {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
         "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Five."}]},
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a document"}) + "\n")
    spec = {"max_docs": None}
    m = collect.run(tiny_config("collect", limit=None, instructions=[],
                                sources=[{"name": "c", "type": "jsonl", "path": str(corpus), "text_field": "text",
                                          "id_field": None, **spec}],
                                preferences=[{"name": "p", "type": "pairs", "path": str(source), **spec}]),
                    paths, evaluate=tiny_config("evaluate"))
    assert m["kinds"]["preferences"]["dropped"] == {"missing_chosen": 1, "missing_rejected": 1, "missing_prompt": 1,
                                                    "malformed_pair": 1}
    implicit = [r for r in read_records(paths.raw, "preferences") if r["chosen"] == "Four."]
    assert [(r["prompt"], r["rejected"]) for r in implicit] == [("Two plus two?", "Five.")]

    c = clean.run(tiny_config("clean"), paths, tiny_config("data", DataConfig))
    assert c["kinds"]["preferences"]["dropped"] == {"empty_answer": 2, "identical_pair": 2}
    quarantined = read_records(paths.quarantine, "preferences")
    assert sorted(q["reason"] for q in quarantined) == ["empty_answer", "empty_answer", "identical_pair",
                                                        "identical_pair"]
    assert all(json.loads(q["record"])["prompt"] == good["prompt"] for q in quarantined)

    # the reward stage: what is left, as the tiny model's tokenizer reads it; the long prompt is skipped
    tok = AutoTokenizer.from_pretrained(tiny_inputs.tokenized / "tokenizer")
    kept = read_records(paths.clean, "preferences")
    assert len(kept) == 3
    train, val, dropped = reward.prepare(kept, tok, tiny_config("reward"))
    assert dropped == {"too_long": 1} and len(train) + len(val) == 2
