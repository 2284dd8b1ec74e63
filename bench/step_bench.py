"""A training step and a forward pass of a causal LM on this CPU: glibc's default allocator against
one that keeps what it frees, each in fp32 and under bf16 autocast.

"Kept": `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, INT_MAX)`, so that a block as large
as a step's logits or gradients is not mapped afresh, and faulted in page by zeroed page, at every
step, but reused from the heap. BENCHMARKS.md ("Two ways to a faster CPU step") says what this
measured and what the demo's stages made of it.

Each allocator setting runs in its own process (glibc reads its settings once, and a process that
kept its freed memory cannot give it back). In each: the model loaded in fp32, one step of each
kind to warm up, then `--repeats` timed training steps (forward, backward, AdamW) and forward passes
of a random batch of `--batch` x `--seq` tokens, with the process's page faults and its user and
system CPU seconds over them. The losses are printed so that a run shows both allocators compute the
same numbers. The default model is the demo's `models/base` (after `make run`).

    python -m bench.step_bench [--model models/base] [--batch 4] [--seq 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("default", "kept")  # glibc as it comes; freed memory kept (keep_freed_memory)
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast on the CPU, weights and optimizer in fp32
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc keeps what this process frees (no mmap for large blocks, no trim); True if it took them."""
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def child(model_dir: str, mode: str, batch: int, seq: int, repeats: int) -> dict:
    """The timings of one allocator setting, in this process."""
    if mode == "kept" and not keep_freed_memory():
        raise SystemExit("mallopt refused: not glibc's allocator")
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def train(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def forward(bf16: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=ids, labels=ids).loss.item()

    steps = {}
    for kind, fn in (("train_step", train), ("forward", forward)):
        for precision in PRECISIONS:
            fn(precision == "bf16")  # warm-up
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            seconds, losses = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                losses.append(round(fn(precision == "bf16"), 6))
                seconds.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_SELF)
            steps[f"{kind}/{precision}"] = {
                "median_s": round(statistics.median(seconds), 2),
                "user_s": round(after.ru_utime - before.ru_utime, 1),
                "system_s": round(after.ru_stime - before.ru_stime, 1),
                "page_faults": after.ru_minflt - before.ru_minflt,
                "wall_s": round(time.perf_counter() - started, 1),
                "losses": losses,
            }
    return {"steps": steps, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base", help="a causal LM folder (default: the demo's base model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/step_bench.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.child, args.batch, args.seq, args.repeats)))
        return 0
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no model folder there (run `make run` first, or name one)")

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    results = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, "-m", "bench.step_bench", "--child", mode, "--model", args.model,
                               "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{args.model}, {args.batch} x {args.seq} tokens, {args.repeats} timed runs each, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads: default")
    print(f"{'what':<20} {'allocator':<9} {'median s':>9} {'user s':>7} {'sys s':>6} {'page faults':>12}  losses")
    for key in results["default"]["steps"]:
        for mode in MODES:
            r = results[mode]["steps"][key]
            print(f"{key:<20} {mode:<9} {r['median_s']:>9} {r['user_s']:>7} {r['system_s']:>6} "
                  f"{r['page_faults']:>12}  {r['losses']}")
    print("peak MiB: " + ", ".join(f"{m} {results[m]['peak_mib']}" for m in MODES))
    same = all(results["default"]["steps"][k]["losses"] == results["kept"]["steps"][k]["losses"]
               for k in results["default"]["steps"])
    print(f"same losses with either allocator: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq,
                                    "repeats": args.repeats, "results": results, "same_losses": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
