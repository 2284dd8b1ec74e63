"""quantize: the final model in 4 and 8 bits, and what each method costs in quality and buys in size and speed.

Reads the aligned model `quantize.model` names (`models/dpo/` or `models/ppo/`) and `data/tokenized/`
(val blocks for perplexity, train blocks for GPTQ's calibration). Writes `models/quantized/<method>/`
for each of `quantize.methods` (`stages/common/quantizers.py`; a method that cannot run here is
skipped with its reason) and `reports/quantize/` (`metrics.json`, `table.md`: size, perplexity and
tokens/s against the fp32 model, `samples.json`).

    python -m stages.quantize [--params params.yaml] [--no-mlflow]
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from stages.common import lm, quantizers
from stages.common.config import Paths, StageConfig
from stages.common.io import atomic_dir, write_json
from stages.common.runner import run_stage
from stages.common.sections import FinalModel
from stages.common.training import model_metrics, stable_safetensors

log = logging.getLogger("llm_forge.quantize")

Method = Literal["nf4", "int8", "torchao_int8", "gptq", "hqq"]


class QuantizeConfig(FinalModel, StageConfig):
    """The `quantize` section: the final model (stages/common/sections.py, register reads it), which
    quantizations of it to make and how to measure them."""

    methods: list[Method]
    """Methods to run, in order: nf4 / int8 (bitsandbytes), torchao_int8 (int8 weight-only), gptq
    (GPTQModel), hqq."""
    perplexity_blocks: int | None = Field(ge=1)
    """Val blocks of data/tokenized that perplexity is measured on (null: all)."""
    batch_size: int = Field(ge=1)
    """Blocks per forward pass when measuring perplexity."""
    speed_prompt_tokens: int = Field(ge=1)
    """Tokens of the first val block that the speed test and each model's greedy sample continue."""
    speed_tokens: int = Field(ge=1)
    """Greedy tokens generated per speed run (and the length of the sample)."""
    speed_repeats: int = Field(ge=1)
    """Speed runs per model; the fastest counts."""
    int8_threshold: float = Field(ge=0)
    """LLM.int8: input columns holding a value this large bypass int8 (0: none; bitsandbytes' default 6).
    A small model has small activations, so a lower threshold keeps more columns exact
    (`python -m bench.quantize_bench --thresholds ...` measures the trade against tokens/s)."""
    gptq: quantizers.CalibratedOptions
    """GPTQ: bits, group size, symmetric or not, calibration blocks."""
    hqq: quantizers.HQQOptions
    """HQQ: bits, group size, axis."""

    @field_validator("methods")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("name at least one method")
        if len(set(methods)) != len(methods):
            raise ValueError(f"{methods} names a method twice")
        return methods


class Unavailable(Exception):
    """A method this machine cannot run (hardware or package missing): skipped with this reason."""


# --- the methods: each returns the quantized model, loaded from the unquantized folder ----------

# NF4 dequantizes to this dtype for its matmuls: bf16, the usual choice on GPUs and on CPUs with
# AVX-512 bf16 (the bench compares it with fp32).
NF4_COMPUTE_DTYPE = "bfloat16"
# bitsandbytes' CPU 4-bit matmul (AVX-512 bf16) packs output rows in blocks of 32 and reshapes the
# scales to one per 64 inputs: a linear layer of another shape fails at its first forward pass.
NF4_CPU_ROWS, NF4_BLOCK = 32, 64


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise Unavailable(f"needs the `{package}` package (pip install {package})")


def _device_map() -> dict[str, Any]:
    import torch

    return {"device_map": "cuda"} if torch.cuda.is_available() else {}


def load_quantized(src: Path, q: Any, keep_dtype: str = quantizers.KEEP_DTYPE) -> Any:
    """`src` loaded through the quantization config `q`; what `q` leaves unquantized in `keep_dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=getattr(torch, keep_dtype),
                                                **_device_map())


def quantize_nf4(cfg: QuantizeConfig, src: Path, paths: Paths, tokenizer: Any, *, quant_type: str = "nf4",
                 double_quant: bool = False, compute_dtype: str = NF4_COMPUTE_DTYPE,
                 keep_dtype: str = quantizers.KEEP_DTYPE, keep: tuple[str, ...] = ()) -> Any:
    """bitsandbytes 4-bit NormalFloat, blockwise absmax scales (QLoRA's format). The keyword
    arguments are the variants `bench/quantize_bench.py` compares (`keep`: module name patterns
    left unquantized)."""
    import torch
    from transformers import BitsAndBytesConfig

    _need("bitsandbytes")
    default, unfit = nf4_unfit_layers(src)
    if unfit:  # kept in bf16, so that the folder runs on any machine, CPUs included
        log.warning("nf4: %d linear layers stay unquantized: bitsandbytes' CPU kernel needs output sizes in "
                    "multiples of %d and input sizes in multiples of %d (%s)", len(unfit), NF4_CPU_ROWS, NF4_BLOCK,
                    ", ".join(unfit))
    skip = [*default, *(re.escape(name) for name in unfit), *keep] if unfit or keep else None
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, llm_int8_skip_modules=skip,
                           bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    return load_quantized(src, q, keep_dtype)


def nf4_unfit_layers(src: Path) -> tuple[list[str], list[str]]:
    """The modules transformers keeps unquantized by default (the lm_head), and the linear layers
    bitsandbytes' CPU 4-bit kernel cannot take (real models have none; the tiny test model's
    172-wide MLP is one)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    unfit = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (m.out_features % NF4_CPU_ROWS or m.in_features % NF4_BLOCK)]
    # sorted: transformers collects them in a set, whose order (and so the saved config's bytes)
    # changes from process to process
    return sorted(get_keys_to_not_convert(model)), unfit


def quantize_int8(cfg: QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
    """bitsandbytes LLM.int8: int8 weights per row, activation outlier columns kept in fp16."""
    from transformers import BitsAndBytesConfig

    _need("bitsandbytes")
    return load_quantized(src, BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.int8_threshold))


def quantize_torchao_int8(cfg: QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
    """torchao int8 weight-only, one scale per output row; matmuls run in the activations' dtype.
    transformers saves its tensor subclass to safetensors (flattened, described in the metadata)."""
    from transformers import TorchAoConfig

    _need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return load_quantized(src, TorchAoConfig(Int8WeightOnlyConfig()))


def quantize_gptq(cfg: QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
    """GPTQ with GPTQModel (CPU: its torch backend; GPU: its fastest kernel)."""
    _need("gptqmodel")
    return quantizers.quantize_gptq(cfg.gptq, src, paths, tokenizer)


def quantize_hqq(cfg: QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
    """HQQ, calibration-free, with the hqq library."""
    _need("hqq")
    return quantizers.quantize_hqq(cfg.hqq, src)


QUANTIZERS: dict[str, Callable[[QuantizeConfig, Path, Paths, Any], Any]] = {
    "nf4": quantize_nf4,
    "int8": quantize_int8,
    "torchao_int8": quantize_torchao_int8,
    "gptq": quantize_gptq,
    "hqq": quantize_hqq,
}


# --- measuring --------------------------------------------------------------------------------


def speed_prompt(blocks: Any, cfg: QuantizeConfig) -> list[int]:
    """The token ids every model continues for its tokens/s and its sample: held-out text."""
    return blocks[0, :cfg.speed_prompt_tokens].tolist()


def measure(model: Any, tokenizer: Any, blocks: Any, cfg: QuantizeConfig) -> tuple[dict[str, float], str]:
    """Perplexity and greedy tokens/s of `model`, and its greedy continuation of the speed prompt."""
    # LLM.int8 warns on every matmul that it casts fp32/bf16 activations to fp16 (its design).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    prompt = speed_prompt(blocks, cfg)
    figures = {
        "perplexity": lm.perplexity(model, blocks, cfg.batch_size),
        "tokens_per_second": lm.generation_speed(model, tokenizer, prompt, cfg.speed_tokens, cfg.speed_repeats),
    }
    return figures, lm.greedy(model, tokenizer, [prompt], cfg.speed_tokens)[0]


def compare(figures: dict[str, float], reference: dict[str, Any]) -> dict[str, float]:
    """A method's figures relative to the unquantized model."""
    return {
        "perplexity_change_pct": round(100 * (figures["perplexity"] / reference["perplexity"] - 1), 2),
        "size_ratio_vs_fp32": round(figures["size_mb"] / reference["fp32_mb"], 4),
        "speedup": round(figures["tokens_per_second"] / reference["tokens_per_second"], 3),
    }


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


# --- the stage --------------------------------------------------------------------------------


def measure_reference(cfg: QuantizeConfig, src: Path, tokenizer: Any, blocks: Any) -> tuple[dict[str, Any], str]:
    """The unquantized model in fp32, whatever dtype its folder stores: the row every method is
    compared with. A folder that does not load is a StageError naming it."""
    import torch

    model = lm.load_causal_lm(src, dtype=torch.float32, **_device_map())
    n_params = sum(p.numel() for p in model.parameters())
    stored = lm.stored_dtype(lm.read_config(src))
    figures, sample = measure(model, tokenizer, blocks, cfg)
    del model
    lm.free()
    log.info("reference (%s, %.1fM parameters, stored in %s): %s", src, n_params / 1e6, stored, figures)
    return {"size_mb": lm.folder_size_mb(src), "fp32_mb": round(n_params * 4 / 1e6, 2), "stored_dtype": stored,
            "parameters": n_params, **figures}, sample


def quantize_one(quantizer: Callable[..., Any], cfg: QuantizeConfig, paths: Paths, tokenizer: Any,
                 blocks: Any, reference: dict[str, Any], folder: Path) -> tuple[dict[str, Any], str]:
    """Quantize the final model with `quantizer`, save it to `folder` with the final model's
    tokenizer, reload it from there (as a user gets it) and measure it."""
    from transformers import AutoTokenizer

    src = Path(cfg.final(paths))
    model = quantizer(cfg, src, paths, tokenizer)
    model.save_pretrained(folder)
    del model
    lm.free()
    keep_run_logs(folder, paths.report_dir("quantize") / folder.name)
    stable_safetensors(folder)
    has_own = (src / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(str(src if has_own else Path(paths.tokenized) / "tokenizer")).save_pretrained(folder)
    (folder / "llm_forge.yaml").write_text(yaml.safe_dump({"quantize": cfg.model_dump(mode="json")}, sort_keys=False))
    size_mb = lm.folder_size_mb(folder)
    model = lm.load_causal_lm(folder, **_device_map())
    quantized, linear = lm.quantized_layers(model)
    if not quantized:
        raise RuntimeError(f"{folder} loads back without a quantized layer")
    figures, sample = measure(model, tokenizer, blocks, cfg)
    figures = {"size_mb": size_mb, **figures}
    result = {**figures, **compare(figures, reference), "quantized_layers": quantized, "linear_layers": linear}
    write_json(folder / "metrics.json", model_metrics(result))  # tokens/s and speedup stay in the report
    return result, sample


# Files a quantization library writes beside the weights that describe its run, not the model
# (GPTQModel's per-layer losses and seconds): moved to the report, so that the folder holds the
# same bytes whenever the same model is quantized again.
RUN_LOGS = ("quant_log.csv",)


def keep_run_logs(folder: Path, report: Path) -> None:
    for name in RUN_LOGS:
        if (folder / name).is_file():
            report.mkdir(parents=True, exist_ok=True)
            shutil.move(folder / name, report / name)


def markdown(metrics: dict[str, Any]) -> str:
    """One row per model: the reference, each method that ran, each method skipped with its reason."""
    ref = metrics["reference"]
    lines = ["| model | size (MB) | x smaller than fp32 | perplexity | change | tokens/s | speedup |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             (f"| unquantized, fp32 ({ref['stored_dtype']} on disk: {ref['size_mb']:.1f} MB) | {ref['fp32_mb']:.1f} | "
              f"1.00 | {ref['perplexity']:.3f} | | {ref['tokens_per_second']:.2f} | 1.00 |")]
    for method, m in metrics["methods"].items():
        lines.append(f"| {method} | {m['size_mb']:.1f} | {1 / m['size_ratio_vs_fp32']:.2f} | {m['perplexity']:.3f} | "
                     f"{m['perplexity_change_pct']:+.2f}% | {m['tokens_per_second']:.2f} | {m['speedup']:.2f} |")
    for method, reason in metrics["skipped"].items():
        lines.append(f"| {method} | skipped: {reason.replace('|', '/')} | | | | | |")
    return "\n".join(lines) + "\n"


def run(cfg: QuantizeConfig, paths: Paths) -> dict[str, Any]:
    final = Path(cfg.final(paths))
    tokenizer = lm.load_tokenizer(final, Path(paths.tokenized) / "tokenizer")
    blocks = lm.val_blocks(paths.tokenized, cfg.perplexity_blocks)
    started = time.perf_counter()
    reference, sample = measure_reference(cfg, final, tokenizer, blocks)
    reference["seconds"] = round(time.perf_counter() - started, 1)
    samples = {"prompt": tokenizer.decode(speed_prompt(blocks, cfg)), "reference": sample}

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with atomic_dir(paths.quantized) as out:
        for method in cfg.methods:
            started = time.perf_counter()
            try:
                results[method], samples[method] = quantize_one(QUANTIZERS[method], cfg, paths, tokenizer, blocks,
                                                                reference, out / method)
                # what the method cost here, quantizing, saving, reloading and measuring (the report's only)
                results[method]["seconds"] = round(time.perf_counter() - started, 1)
                log.info("%s: %s", method, results[method])
            except Unavailable as err:
                skipped[method] = str(err)
            except Exception as err:  # one method failing on this machine is a recorded skip, not a crash
                skipped[method] = f"failed: {one_line(err)}"
                log.debug("%s failed", method, exc_info=True)
            finally:
                lm.free()
            if method in skipped:
                log.warning("%s: skipped: %s", method, skipped[method])
                shutil.rmtree(out / method, ignore_errors=True)
    if not results:
        log.warning("no method ran (%s): %s is empty", skipped, paths.quantized)

    metrics = {"reference": reference, "methods": results, "skipped": skipped, "methods_run": len(results)}
    report = paths.report_dir("quantize")
    report.mkdir(parents=True, exist_ok=True)
    write_json(report / "samples.json", samples)
    (report / "table.md").write_text(markdown(metrics))
    log.info("\n%s", (report / "table.md").read_text())
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("quantize", QuantizeConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
