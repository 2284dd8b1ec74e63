"""quantize: NF4, LLM.int8 and torchao int8 folders that load back quantized and generate; metrics
and reports; GPTQ skipped without CUDA; a failing method skipped; bad config and a missing model.

The final model (`models/ppo`) is the tiny profile's random-init base with the tiny tokenizer, so
these tests do not depend on the training stages.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

import stages.quantize as quantize
from stages.common.config import ConfigError, Paths, StageError, load_section
from stages.quantize import QuantizeConfig, run
from tests.conftest import tiny_model

# Short measurements: the tiny model's figures only have to exist and be consistent.
TINY = dict(eval_blocks=2, batch_size=2, speed_tokens=4, speed_repeats=1)
CPU_METHODS = ("nf4", "int8", "torchao_int8")


def build_final_model(paths: Paths) -> None:
    """models/ppo: the tiny base with the tiny tokenizer beside it."""
    tiny_model(paths, paths.ppo)


@pytest.fixture
def q_paths(tiny_workdir: Paths) -> Paths:
    build_final_model(tiny_workdir)
    return tiny_workdir


def weight_class(method: str) -> type:
    """The class quantized linear weights of `method` have once loaded."""
    if method == "nf4":
        import bitsandbytes as bnb

        return bnb.nn.Params4bit
    if method == "int8":
        import bitsandbytes as bnb

        return bnb.nn.Int8Params
    from torchao.quantization import Int8Tensor

    return Int8Tensor


def assert_loads_quantized_and_generates(folder: Path, method: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.quantization_config, f"{folder} carries no quantization_config"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":  # the tied lm_head is the embedding
            # bitsandbytes' CPU 4-bit kernel needs output sizes in multiples of 32 and input sizes in
            # multiples of 64: the tiny model's MLP (172 wide) stays unquantized under nf4.
            fits = method != "nf4" or (module.out_features % 32 == 0 and module.in_features % 64 == 0)
            assert isinstance(module.weight, weight_class(method)) == fits, (name, type(module.weight))
    ids = tok("Human: hello\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    written = yaml.safe_load((folder / "llm_forge.yaml").read_text())["quantize"]
    assert written["method"] == method and written["eval_blocks"] == TINY["eval_blocks"]
    assert json.loads((folder / "metrics.json").read_text())["size_mb"] > 0


def test_cpu_methods_write_folders_that_load_back_quantized(q_paths: Paths) -> None:
    import torch

    m = run(QuantizeConfig(methods=[*CPU_METHODS, "gptq"], **TINY), q_paths)

    ref = m["reference"]
    assert ref["stored_dtype"] == "float32" and ref["size_mb"] > 0
    assert ref["fp32_mb"] == round(ref["parameters"] * 4 / 1e6, 2)
    assert math.isfinite(ref["perplexity"]) and ref["tokens_per_second"] > 0
    assert sorted(m["methods"]) == sorted(CPU_METHODS) and m["methods_run"] == 3
    assert sorted(p.name for p in q_paths.quantized.iterdir()) == sorted(CPU_METHODS)  # no leftovers
    for method in CPU_METHODS:
        r = m["methods"][method]
        assert r["size_mb"] < ref["size_mb"], method  # fp32 on disk: every method is smaller
        assert math.isfinite(r["perplexity"]) and r["tokens_per_second"] > 0
        assert r["perplexity_change_pct"] == round(100 * (r["perplexity"] / ref["perplexity"] - 1), 2)
        assert r["size_ratio_vs_fp32"] == round(r["size_mb"] / ref["fp32_mb"], 4)
        assert r["speedup"] == round(r["tokens_per_second"] / ref["tokens_per_second"], 3)
        assert 0 < r["quantized_layers"] < r["linear_layers"]
        assert_loads_quantized_and_generates(q_paths.quantized / method, method)
    if torch.cuda.is_available():
        assert "gptq" in m["skipped"] or "gptq" in m["methods"]
    else:
        assert m["skipped"] == {"gptq": "needs a CUDA GPU; none here"}

    report = q_paths.report_dir("quantize")
    samples = json.loads((report / "samples.json").read_text())
    assert set(samples) == {"prompt", "reference", *CPU_METHODS}
    assert all(isinstance(samples[k], str) for k in samples)
    table = (report / "table.md").read_text().splitlines()
    assert len(table) == 2 + 1 + 3 + 1  # header, reference, three methods, the skip
    assert table[-1].startswith("| gptq | skipped")


def test_a_failing_method_is_skipped_and_the_others_still_run(q_paths: Paths,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this\nshape")

    monkeypatch.setitem(quantize.QUANTIZERS, "int8", broken)
    m = run(QuantizeConfig(methods=["int8", "nf4"], **TINY), q_paths)
    assert m["skipped"] == {"int8": "failed: RuntimeError: no kernel for this shape"}
    assert list(m["methods"]) == ["nf4"] and m["methods_run"] == 1
    assert [p.name for p in q_paths.quantized.iterdir()] == ["nf4"]


def test_a_folder_that_loads_back_unquantized_is_a_failure(q_paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(quantize.QUANTIZERS, "torchao_int8",
                        lambda cfg, src, paths, tok: AutoModelForCausalLM.from_pretrained(src))
    m = run(QuantizeConfig(methods=["torchao_int8"], **TINY), q_paths)
    assert m["methods_run"] == 0 and "without a quantized layer" in m["skipped"]["torchao_int8"]
    assert q_paths.quantized.is_dir() and not any(q_paths.quantized.iterdir())


def test_a_rerun_replaces_the_whole_output(q_paths: Paths) -> None:
    run(QuantizeConfig(methods=["nf4"], **TINY), q_paths)
    (q_paths.quantized / "stale").mkdir()
    run(QuantizeConfig(methods=["torchao_int8"], **TINY), q_paths)
    assert [p.name for p in q_paths.quantized.iterdir()] == ["torchao_int8"]
    assert not [p for p in q_paths.quantized.parent.iterdir() if p.name.startswith(".quantized")]


@pytest.mark.parametrize("broken", ["missing", "no_weights"])
def test_a_final_model_that_does_not_load_is_a_stage_error(q_paths: Paths, broken: str) -> None:
    if broken == "missing":
        shutil.rmtree(q_paths.ppo)
    else:
        (q_paths.ppo / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StageError, match=str(q_paths.ppo)):
        run(QuantizeConfig(methods=["nf4"], **TINY), q_paths)
    assert not q_paths.quantized.exists()


def test_unknown_or_repeated_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"quantize\.methods\.1: .*'nf4'.*\(got 'fp3'\)"):
        load_section(QuantizeConfig, "quantize", {"quantize": {"methods": ["nf4", "fp3"]}})
    with pytest.raises(ConfigError, match=r"quantize\.methods: .*names a method twice"):
        load_section(QuantizeConfig, "quantize", {"quantize": {"methods": ["nf4", "nf4"]}})
    with pytest.raises(ConfigError, match=r"quantize\.methods: .*at least one"):
        load_section(QuantizeConfig, "quantize", {"quantize": {"methods": []}})


def test_stage_cli_writes_metrics(q_paths: Paths, tmp_path: Path) -> None:
    params = {"paths": {k: str(v) for k, v in q_paths.model_dump().items()},
              "quantize": {"methods": ["nf4", "gptq"], **TINY}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert quantize.main(["--params", str(tmp_path / "params.yaml"), "--no-mlflow"]) == 0
    metrics = json.loads((q_paths.report_dir("quantize") / "metrics.json").read_text())
    assert set(metrics) >= {"reference", "methods", "skipped", "methods_run", "seconds"}
    assert metrics["methods_run"] == 1 and (q_paths.quantized / "nf4" / "config.json").is_file()


def test_gptq_without_its_packages_names_them(q_paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gptqmodel", "optimum") else real_find_spec(name, *a))
    with pytest.raises(quantize.Unavailable, match=r"gptqmodel, optimum \(pip install gptqmodel optimum\)"):
        quantize.quantize_gptq(QuantizeConfig(), q_paths.ppo, q_paths, None)
