"""Quantization variants of the final model, side by side in one run: the figures BENCHMARKS.md quotes.

The quantize stage measures the methods in `quantize.methods` with the settings in params.yaml;
this script measures the settings around them, the same way (`stages.quantize.quantize_one`: each
variant quantized, saved, reloaded from its folder, then held-out perplexity on the same val blocks
and greedy tokens/s on the same prompt) against the same fp32 reference:

- `nf4`, `int8@<t>` (LLM.int8 at each outlier threshold of `--thresholds`), `torchao_int8`;
- NF4 variants: `nf4_keep_fp32` (the parts left unquantized stored in fp32 instead of bf16),
  `nf4_compute_fp32` (fp32 matmuls), `nf4_double_quant`, `fp4`, and `nf4_keep:<kinds>` (the layers
  named by `--nf4-keep`, e.g. `down_proj,v_proj,up_proj`, left in bf16);
- `gptq`, `hqq`: the stage's settings (`quantize.gptq`, `quantize.hqq`), and one more variant per
  `--gptq` / `--hqq` spec, `key=value` pairs joined by commas, named `gptq[<spec>]`: a key of
  `quantize.gptq` (`calibration_blocks`, `calibration`, `group_size`...) or any other key of
  GPTQModel's `QuantizeConfig` (`act_group_aware`, `desc_act`, `damp_percent`, `mse`...); a key
  of `quantize.hqq`, `compute_dtype`, or one of hqq's weight settings (`optimize`, `round_zero`);
- `q4_1_grid`: no folder, the weights rounded in memory to an asymmetric 4-bit grid in groups of 32
  whose minimum is any float (the Q4_1 GGUF format the demo model was de-quantised from);
  `int_zero_grid`: rounded as GPTQModel rounds (the range widened to hold 0, the zero point a
  whole number of steps, as GPTQ's format stores it) without its error compensation: perplexity only.

Each row also holds `quantize_seconds` (the quantizer's own time, not the save, reload and
measurement), `seconds` (all of it) and the `quantization_config` its folder carries (the settings
the library recorded).

It reads `paths` and the `quantize` section of `--params` (with `--profile` applied, e.g. the tiny
profile for a quick check), quantizes `paths.ppo` or `--model`, and writes `table.md` and
`results.json` to `--out`.

    python -m bench.quantize_bench [--params params.yaml] [--profile PROFILE] [--model DIR] [--blocks 16]
                                   [--thresholds 6 2 1] [--nf4-keep down_proj,v_proj,up_proj]
                                   [--gptq act_group_aware=false damp_percent=0.01 ...]
                                   [--hqq group_size=64 ...]
                                   [--variants nf4 fp4 ...] [--out bench/out/quantize]
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from stages import quantize
from stages.common import lm, quantizers
from stages.common.config import Paths, load_section, overlay, read_yaml
from stages.common.io import write_json

Quantizer = Callable[..., Any]


def int8_at(threshold: float) -> Quantizer:
    def quantizer(cfg: quantize.QuantizeConfig, *args: Any) -> Any:
        return quantize.quantize_int8(cfg.model_copy(update={"int8_threshold": threshold}), *args)
    return quantizer


def parse_spec(spec: str) -> dict[str, Any]:
    """`key=value,key=value` -> {key: value}, each value read as YAML (true, 0.01, 64, head)."""
    pairs = [part.split("=", 1) for part in spec.split(",") if part]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{spec!r}: write key=value pairs joined by commas")
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def gptq_with(spec: str) -> Quantizer:
    """GPTQ with `quantize.gptq` changed by `spec`; keys that `quantize.gptq` lacks go to GPTQModel."""
    changes = parse_spec(spec)
    ours = {k: v for k, v in changes.items() if k in quantizers.CalibratedOptions.model_fields}
    theirs = {k: v for k, v in changes.items() if k not in ours}

    def quantizer(cfg: quantize.QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
        quantize._need("gptqmodel")
        opts = quantizers.CalibratedOptions.model_validate({**cfg.gptq.model_dump(), **ours})
        return quantizers.quantize_gptq(opts, src, paths, tokenizer, **theirs)
    return quantizer


def hqq_with(spec: str) -> Quantizer:
    """HQQ with `quantize.hqq` changed by `spec`; `compute_dtype`, and keys that `quantize.hqq` lacks
    (hqq's weight settings: `optimize`, `round_zero`), go to hqq."""
    changes = parse_spec(spec)
    ours = {k: v for k, v in changes.items() if k in quantizers.HQQOptions.model_fields}
    theirs = {k: v for k, v in changes.items() if k not in ours}

    def quantizer(cfg: quantize.QuantizeConfig, src: Path, paths: Paths, tokenizer: Any) -> Any:
        quantize._need("hqq")
        opts = quantizers.HQQOptions.model_validate({**cfg.hqq.model_dump(), **ours})
        return quantizers.quantize_hqq(opts, src, **theirs)
    return quantizer


def timed(quantizer: Quantizer, seconds: list[float]) -> Quantizer:
    """`quantizer`, appending its own run time to `seconds`."""
    def run(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return quantizer(*args)
        finally:
            seconds.append(time.perf_counter() - started)
    return run


def variants(thresholds: list[float], nf4_keep: str | None, gptq: list[str] = (),
             hqq: list[str] = ()) -> dict[str, Quantizer | None]:
    """Variant name -> quantizer (None: a grid row, measured in memory)."""
    nf4 = quantize.quantize_nf4
    found: dict[str, Quantizer | None] = {
        "nf4": nf4,
        "nf4_keep_fp32": functools.partial(nf4, keep_dtype="float32"),
        "nf4_compute_fp32": functools.partial(nf4, compute_dtype="float32"),
        "nf4_double_quant": functools.partial(nf4, double_quant=True),
        "fp4": functools.partial(nf4, quant_type="fp4"),
        **{f"int8@{t:g}": int8_at(t) for t in thresholds},
        "torchao_int8": quantize.quantize_torchao_int8,
        "gptq": quantize.quantize_gptq,
        "hqq": quantize.quantize_hqq,
        "q4_1_grid": None,
        "int_zero_grid": None,
    }
    if nf4_keep:
        found[f"nf4_keep:{nf4_keep}"] = functools.partial(nf4, keep=tuple(nf4_keep.split(",")))
    found.update({f"gptq[{spec}]": gptq_with(spec) for spec in gptq})
    found.update({f"hqq[{spec}]": hqq_with(spec) for spec in hqq})
    return found


def round_to_grid(model: Any, group: int = 32, integer_zero: bool = False) -> None:
    """Every linear weight of the decoder layers rounded in place to 16 levels over each group of
    `group` inputs: from its min to its max (GGUF Q4_1), or (`integer_zero`) as GPTQModel's
    quantizer rounds (`Quantizer.find_params`, asymmetric): the range widened to hold 0, and the
    zero point rounded to a whole number of steps, so that the levels sit on multiples of the step."""
    import torch

    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % group == 0:
                w = module.weight.view(-1, group)
                lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
                if integer_zero:
                    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
                scale = ((hi - lo) / 15).clamp_min(1e-12)
                if integer_zero:
                    zero = torch.round(-lo / scale)
                    w.copy_((torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale)
                else:
                    w.copy_(torch.round((w - lo) / scale) * scale + lo)


def bench(cfg: quantize.QuantizeConfig, paths: Paths, chosen: dict[str, Quantizer | None]) -> dict[str, Any]:
    import torch

    tokenizer = lm.load_tokenizer(paths.ppo, Path(paths.tokenized) / "tokenizer")
    blocks = lm.val_blocks(paths.tokenized, cfg.perplexity_blocks)
    reference, _ = quantize.measure_reference(cfg, Path(paths.ppo), tokenizer, blocks)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, quantizer) in enumerate(chosen.items()):
            started = time.perf_counter()
            quantize_seconds: list[float] = []
            try:
                if quantizer is None:
                    model = lm.load_causal_lm(paths.ppo, dtype=torch.float32)
                    round_to_grid(model, integer_zero=name == "int_zero_grid")
                    ppl = lm.perplexity(model, blocks, cfg.batch_size)
                    results[name] = {"perplexity": ppl,
                                     "perplexity_change_pct": round(100 * (ppl / reference["perplexity"] - 1), 2)}
                    del model
                else:
                    folder = Path(tmp) / f"variant{i}"
                    results[name], _ = quantize.quantize_one(timed(quantizer, quantize_seconds), cfg, paths,
                                                             tokenizer, blocks, reference, folder)
                    results[name]["quantize_seconds"] = round(quantize_seconds[0], 1)
                    results[name]["quantization_config"] = lm.read_config(folder).get("quantization_config")
                results[name]["seconds"] = round(time.perf_counter() - started, 1)
            except Exception as err:  # a variant this machine cannot run is a row that says why
                skipped[name] = quantize.one_line(err)
                logging.getLogger("bench").warning("%s: %s", name, skipped[name], exc_info=True)
            finally:
                lm.free()
            logging.getLogger("bench").info("%s: %.0fs %s", name, time.perf_counter() - started,
                                            results.get(name, skipped.get(name)))
    return {"reference": reference, "methods": results, "skipped": skipped}


def markdown(result: dict[str, Any]) -> str:
    """The stage's table and the quantizer's seconds, with the in-memory rows (perplexity only)
    filled in where they can be."""
    full = {k: v for k, v in result["methods"].items() if "size_mb" in v}
    lines = quantize.markdown({**result, "methods": full}).splitlines()
    lines[0] += " quantize (s) |"
    lines[1] += " ---: |"
    lines[2] += " |"
    for i, m in enumerate(full.values()):
        lines[3 + i] += f" {m['quantize_seconds']:.1f} |"
    for name, m in result["methods"].items():
        if name not in full:
            lines.insert(3 + len(full), f"| {name} (in memory) | | | {m['perplexity']:.3f} | "
                                        f"{m['perplexity_change_pct']:+.2f}% | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--profile", type=Path, help="a profile to apply to the params (e.g. profiles/tiny.yaml)")
    ap.add_argument("--model", type=Path,
                    help="the model to quantize instead of paths.ppo (e.g. models/base, a step before the demo's)")
    ap.add_argument("--blocks", type=int, default=16, help="val blocks for perplexity (default 16)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 2.0, 1.0], help="LLM.int8 thresholds")
    ap.add_argument("--nf4-keep", help="comma-separated module kinds left unquantized in one more NF4 variant")
    ap.add_argument("--gptq", nargs="+", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="one more GPTQ variant per spec (quantize.gptq's keys, or GPTQModel QuantizeConfig's)")
    ap.add_argument("--hqq", nargs="+", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="one more HQQ variant per spec (quantize.hqq's keys)")
    ap.add_argument("--variants", nargs="*",
                    help="only these of the fixed variants (default: all; the flag alone: none); specs always run")
    ap.add_argument("--out", type=Path, default=Path("bench/out/quantize"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    params = read_yaml(args.params)
    if args.profile:
        params = overlay(params, read_yaml(args.profile))
    cfg = load_section(quantize.QuantizeConfig, "quantize", params)
    cfg = cfg.model_copy(update={"perplexity_blocks": args.blocks})
    paths = load_section(Paths, "paths", params)
    if args.model:
        paths = paths.model_copy(update={"ppo": args.model})
    chosen = variants(args.thresholds, args.nf4_keep)
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(chosen))
        if unknown:
            ap.error(f"unknown variants {unknown} (choose from {list(chosen)})")
        chosen = {k: v for k, v in chosen.items() if k in args.variants}
    try:
        specs = variants([], None, args.gptq, args.hqq)
    except ValueError as err:
        ap.error(str(err))
    chosen.update({k: v for k, v in specs.items() if k.startswith(("gptq[", "hqq["))})
    started = time.perf_counter()
    result = bench(cfg, paths, chosen)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["command"] = "python -m bench.quantize_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    (args.out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
