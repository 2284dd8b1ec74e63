"""Each quantization method on a model whose weights were never 4-bit: the tiny profile's model,
trained further, through the quantize stage itself.

The demo model was de-quantised from a Q4_1 GGUF, so a method whose grid matches that one looks
better on it than it is; this measures every method in `quantize.methods` on a model trained here
from random init instead. It runs the tiny profile's data stages (collect ... tokenize, the graph
of dvc.yaml), continues pretraining the tiny random-init base for `--steps` steps, then runs
`stages.quantize.run` on it and prints the stage's table (also in `--out`/reports/quantize/).

    python -m bench.quantize_tiny_bench [--steps 300] [--blocks 16] [--out bench/out/quantize_tiny]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flows.pipeline import stage_order
from stages import pretrain, quantize
from stages.common.config import Paths, load_section, overlay, read_yaml
from stages.common.runner import run_in_process
from stages.common.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def section(params: dict, name: str, cls: type, **changes: object) -> object:
    return load_section(cls, name, {name: overlay(params[name], changes, name)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize_tiny_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps on top of the random init")
    ap.add_argument("--blocks", type=int, default=16, help="val blocks for perplexity")
    ap.add_argument("--out", type=Path, default=Path("bench/out/quantize_tiny"))
    args = ap.parse_args(argv)
    params = overlay(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "profiles/tiny.yaml"))
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    paths = Paths(**{k: out / v for k, v in params["paths"].items()})
    # the data the tiny model reads, as the graph makes it
    run_in_process(stage_order("tokenize", ROOT), params, paths, cwd=ROOT)
    trained = pretrain.run(section(params, "pretrain", pretrain.PretrainConfig, max_steps=args.steps, save_steps=0),
                           paths, section(params, "train", TrainConfig, checkpoints=str(out / "checkpoints")))
    print(f"pretrained {args.steps} steps: perplexity {trained['perplexity_before']} -> {trained['perplexity_after']}")
    quantize.run(section(params, "quantize", quantize.QuantizeConfig, perplexity_blocks=args.blocks),
                 paths.model_copy(update={"ppo": paths.pretrain}))
    print((paths.reports / "quantize" / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
