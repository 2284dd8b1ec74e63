"""tokenize: deterministic split, EOS-joined packing, BPE for from-scratch models, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.base import run as run_base
from stages.common.config import Paths, StageError
from stages.common.io import read_records, write_records
from stages.tokenize import Packer, is_val, pack, run
from tests.conftest import tiny_config

SCRATCH = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
BASE = tiny_config("base", from_scratch=SCRATCH)


def real_docs(n: int = 200) -> list[dict]:
    import importlib.util

    root = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])
    lines = (root / "test/test_data/lee_background.cor").read_text(encoding="utf-8").splitlines()
    return [{"id": f"abc/{i}", "source": "abc", "text": t} for i, t in enumerate(lines[:n])]


def test_pack_joins_documents_with_eos_and_cuts_full_blocks() -> None:
    docs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([9, 10], np.int32)]
    blocks, left = pack(docs, eos_id=2, block_size=4)
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]] and left == 1


def test_packer_shard_by_shard_gives_packs_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, rng.integers(0, 30), dtype=np.int32) for _ in range(50)]
    blocks, left = pack(docs, eos_id=2, block_size=16)
    packer = Packer(tmp_path / "blocks.arrow", eos_id=2, block_size=16)
    for lo in range(0, 50, 7):  # shards of 7 documents
        packer.add(docs[lo: lo + 7])
        assert len(packer.carry) < 16  # what waits for the next shard is less than a block
    table, leftover = packer.close()
    assert np.array(table.column("input_ids").to_pylist()).tolist() == blocks.tolist() and leftover == left


def test_split_is_a_stable_function_of_the_id() -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    val = {i for i in ids if is_val(i, "s", 0.1)}
    assert 150 < len(val) < 250
    assert val == {i for i in ids if is_val(i, "s", 0.1)}
    assert {i for i in ids[:1000] if is_val(i, "s", 0.1)} == {i for i in val if int(i[4:]) < 1000}
    assert val != {i for i in ids if is_val(i, "other salt", 0.1)}


def test_from_scratch_base_gets_a_trained_bpe(paths: Paths) -> None:
    import datasets
    from transformers import AutoTokenizer

    write_records(paths.dedup, "corpus", real_docs())
    run_base(BASE, paths)
    cfg = tiny_config("tokenize", block_size=32, val_fraction=0.1)
    m = run(cfg, paths, data=tiny_config("data"))
    assert m["tokenizer_trained"] and m["vocab_size"] <= 512
    assert m["docs_in"] == m["docs_out"] == 200 and m["val"]["docs"] > 0
    ds = datasets.load_from_disk(str(paths.tokenized))
    assert len(ds["train"]) == m["train"]["blocks"] and len(ds["train"][0]["input_ids"]) == 32
    tok = AutoTokenizer.from_pretrained(paths.tokenized / "tokenizer")
    flat = np.asarray(ds["train"]["input_ids"]).reshape(-1)
    assert (flat == tok.eos_token_id).sum() >= m["train"]["docs"] - 1
    # the blocks decode back to the corpus text
    first = read_records(paths.dedup, "corpus")
    train_texts = [d["text"] for d in first if not is_val(d["id"], cfg.split_salt, cfg.val_fraction)]
    assert tok.decode(ds["train"][0]["input_ids"]).startswith(train_texts[0][:40])
    # same inputs, same blocks
    saved = yaml.safe_load((paths.tokenized / "llm_forge.yaml").read_text())
    assert saved == {"tokenize": cfg.model_dump(mode="json")}
    run(cfg, paths, data=tiny_config("data"))
    again = np.asarray(datasets.load_from_disk(str(paths.tokenized))["train"]["input_ids"]).reshape(-1)
    assert np.array_equal(flat, again)


def test_too_little_data_for_a_block_is_a_clear_error(paths: Paths) -> None:
    write_records(paths.dedup, "corpus", real_docs(30))
    run_base(BASE, paths)
    with pytest.raises(StageError, match="^a split holds fewer tokens than one block of 100000"):
        run(tiny_config("tokenize", block_size=100_000, val_fraction=0.2), paths, data=tiny_config("data"))


def test_empty_corpus_is_a_clear_error(paths: Paths) -> None:
    write_records(paths.dedup, "corpus", [])
    with pytest.raises(StageError, match=r"^\S+corpus holds no document"):  # no "tokenize:" prefix
        run(tiny_config("tokenize"), paths, data=tiny_config("data"))
