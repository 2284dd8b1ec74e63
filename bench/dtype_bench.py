"""What `evaluate.dtype: hardware` chooses on this machine, and what the choice is worth: a model
folder loaded in float32 and in bfloat16, each timed on a forward pass over a batch of blocks and
on greedy decoding (the two kinds of work evaluate's rows do).

`hardware` is bfloat16 where the machine computes it natively (`stages.common.lm.native_bf16`: a
CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and float32 elsewhere, where torch runs bf16
matmuls through conversions to fp32. The default model is the demo's `models/base` (after `make run`).

    python -m bench.dtype_bench [--model models/base] [--batch 8] [--seq 512] [--new-tokens 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn` after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(folder: Path, dtype: str, batch: int, seq: int, new_tokens: int, repeats: int) -> dict:
    """Forward and greedy-decoding seconds of `folder` loaded in `dtype`."""
    import torch

    from stages.common.lm import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(folder, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.inference_mode():
        forward = timed(lambda: model(input_ids=ids), repeats)
        decode = timed(lambda: model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=0), repeats)
    return {"forward_s": round(forward, 3), "decode_s": round(decode, 3),
            "decode_tokens_per_s": round(batch * new_tokens / decode, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/base"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from stages.common.lm import native_bf16, resolve_dtype

    out: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                 "cuda": torch.cuda.is_available(), "native_bf16": native_bf16(),
                 "hardware_resolves_to": resolve_dtype("hardware"), "model": str(args.model)}
    for dtype in DTYPES:
        out[dtype] = measure(args.model, dtype, args.batch, args.seq, args.new_tokens, args.repeats)
    out["bf16_over_fp32"] = {k: round(out["bfloat16"][k] / out["float32"][k], 2) for k in ("forward_s", "decode_s")}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
