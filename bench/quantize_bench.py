"""Quantization variants of the final model, side by side in one run: the figures BENCHMARKS.md quotes.

The quantize stage measures the methods in `quantize.methods` with the settings in params.yaml;
this script measures the settings around them, the same way (`stages.quantize.quantize_one`: each
variant quantized, saved, reloaded from its folder, then held-out perplexity on the same val blocks
and greedy tokens/s on the same prompt) against the same fp32 reference:

- `nf4`, `int8@<t>` (LLM.int8 at each outlier threshold of `--thresholds`), `torchao_int8`;
- NF4 variants: `nf4_keep_fp32` (the parts left unquantized stored in fp32 instead of bf16),
  `nf4_compute_fp32` (fp32 matmuls), `nf4_double_quant`, `fp4`, and `nf4_keep:<kinds>` (the layers
  named by `--nf4-keep`, e.g. `down_proj,v_proj,up_proj`, left in bf16);
- `q4_1_grid`: no folder, the weights rounded in memory to an asymmetric 4-bit grid in groups of 32
  (the Q4_1 GGUF format the demo model was de-quantised from): perplexity only.

It reads `paths` and the `quantize` section of `--params` (with `--profile` applied, e.g. the tiny
profile for a quick check) and writes `table.md` and `results.json` to `--out`.

    python -m bench.quantize_bench [--params params.yaml] [--profile PROFILE] [--blocks 16]
                                   [--thresholds 6 2 1] [--nf4-keep down_proj,v_proj,up_proj]
                                   [--variants nf4 fp4 ...] [--out bench/out/quantize]
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages import quantize
from stages.common import lm
from stages.common.config import Paths, load_section, overlay, read_yaml
from stages.common.io import write_json

Quantizer = Callable[..., Any]


def int8_at(threshold: float) -> Quantizer:
    def quantizer(cfg: quantize.QuantizeConfig, *args: Any) -> Any:
        return quantize.quantize_int8(cfg.model_copy(update={"int8_threshold": threshold}), *args)
    return quantizer


def variants(thresholds: list[float], nf4_keep: str | None) -> dict[str, Quantizer | None]:
    """Variant name -> quantizer (None: `q4_1_grid`, measured in memory)."""
    nf4 = quantize.quantize_nf4
    found: dict[str, Quantizer | None] = {
        "nf4": nf4,
        "nf4_keep_fp32": functools.partial(nf4, keep_dtype="float32"),
        "nf4_compute_fp32": functools.partial(nf4, compute_dtype="float32"),
        "nf4_double_quant": functools.partial(nf4, double_quant=True),
        "fp4": functools.partial(nf4, quant_type="fp4"),
        **{f"int8@{t:g}": int8_at(t) for t in thresholds},
        "torchao_int8": quantize.quantize_torchao_int8,
        "q4_1_grid": None,
    }
    if nf4_keep:
        found[f"nf4_keep:{nf4_keep}"] = functools.partial(nf4, keep=tuple(nf4_keep.split(",")))
    return found


def round_to_q4_1(model: Any, group: int = 32) -> None:
    """Every linear weight of the decoder layers rounded in place to 16 levels between the min and
    the max of each group of `group` inputs (GGUF Q4_1)."""
    import torch

    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % group == 0:
                w = module.weight.view(-1, group)
                lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
                scale = ((hi - lo) / 15).clamp_min(1e-12)
                w.copy_(torch.round((w - lo) / scale) * scale + lo)


def bench(cfg: quantize.QuantizeConfig, paths: Paths, chosen: dict[str, Quantizer | None]) -> dict[str, Any]:
    import torch

    tokenizer = lm.load_tokenizer(paths.ppo, Path(paths.tokenized) / "tokenizer")
    blocks = lm.val_blocks(paths.tokenized, cfg.perplexity_blocks)
    reference, _ = quantize.measure_reference(cfg, Path(paths.ppo), tokenizer, blocks)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantizer in chosen.items():
            started = time.perf_counter()
            try:
                if quantizer is None:
                    model = lm.load_causal_lm(paths.ppo, dtype=torch.float32)
                    round_to_q4_1(model)
                    ppl = lm.perplexity(model, blocks, cfg.batch_size)
                    results[name] = {"perplexity": ppl,
                                     "perplexity_change_pct": round(100 * (ppl / reference["perplexity"] - 1), 2)}
                    del model
                else:
                    folder = Path(tmp) / name.replace(":", "_").replace(",", "_")
                    results[name], _ = quantize.quantize_one(quantizer, cfg, paths, tokenizer, blocks, reference,
                                                             folder)
            except Exception as err:  # a variant this machine cannot run is a row that says why
                skipped[name] = quantize.one_line(err)
                logging.getLogger("bench").warning("%s: %s", name, skipped[name], exc_info=True)
            finally:
                lm.free()
            logging.getLogger("bench").info("%s: %.0fs", name, time.perf_counter() - started)
    return {"reference": reference, "methods": results, "skipped": skipped}


def markdown(result: dict[str, Any]) -> str:
    """The stage's table, with the in-memory rows (perplexity only) filled in where they can be."""
    full = {k: v for k, v in result["methods"].items() if "size_mb" in v}
    lines = quantize.markdown({**result, "methods": full}).splitlines()
    for name, m in result["methods"].items():
        if name not in full:
            lines.insert(3 + len(full), f"| {name} (in memory) | | | {m['perplexity']:.3f} | "
                                        f"{m['perplexity_change_pct']:+.2f}% | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--profile", type=Path, help="a profile to apply to the params (e.g. profiles/tiny.yaml)")
    ap.add_argument("--blocks", type=int, default=16, help="val blocks for perplexity (default 16)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 2.0, 1.0], help="LLM.int8 thresholds")
    ap.add_argument("--nf4-keep", help="comma-separated module kinds left unquantized in one more NF4 variant")
    ap.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/quantize"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    params = read_yaml(args.params)
    if args.profile:
        params = overlay(params, read_yaml(args.profile))
    cfg = load_section(quantize.QuantizeConfig, "quantize", params)
    cfg = cfg.model_copy(update={"perplexity_blocks": args.blocks})
    paths = load_section(Paths, "paths", params)
    chosen = variants(args.thresholds, args.nf4_keep)
    if args.variants:
        unknown = sorted(set(args.variants) - set(chosen))
        if unknown:
            ap.error(f"unknown variants {unknown} (choose from {list(chosen)})")
        chosen = {k: v for k, v in chosen.items() if k in args.variants}
    started = time.perf_counter()
    result = bench(cfg, paths, chosen)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["command"] = "python -m bench.quantize_bench " + " ".join(argv or [])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", result)
    (args.out / "table.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
