"""The sandbox's cost per program: HumanEval's programs under bubblewrap and under the runner before it.

Every problem of HumanEval (`assets/lm_eval/humaneval.jsonl`, as `make setup` wrote it) with two
completions: its reference solution (which passes) and a wrong one (`return None`, which fails),
each built into a program as the evaluate task builds it (`configs/lm_eval/humaneval_utils.py`) and
run with the task's time and memory limits through `stages.common.sandbox.run_program` twice, side
by side: `bwrap` (bubblewrap, what evaluate uses) and `unsafe_no_sandbox` (a separate process with
the same limits and preamble in a network namespace: the only runner before bubblewrap). The two
alternate which goes first from one program to the next, so that a busy machine slows both alike.

Prints the wall time per program of each (median, mean, 90th percentile), the paired difference
and ratio, how many programs end with the same outcome under both (the goal: all of them), and
the one-off probe a process makes before its first sandboxed program.

    python -m bench.sandbox_bench [--limit 164] [--out bench/out]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANDBOXES = ("unsafe_no_sandbox", "bwrap")
WRONG = "    return None\n"


def task_utils():
    spec = importlib.util.spec_from_file_location("humaneval_utils", ROOT / "configs/lm_eval/humaneval_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    from stages.common import sandbox

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    ap.add_argument("--out", type=Path, default=None, help="folder for sandbox_bench.json")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    reason = sandbox.unavailable()  # the one-off probe of a process: a sandboxed `pass`
    probe = time.perf_counter() - started
    if reason:
        raise SystemExit(f"no sandbox here: {reason}")
    utils = task_utils()
    docs = [json.loads(line) for line in (ROOT / "assets/lm_eval/humaneval.jsonl").read_text().splitlines()]
    docs = docs[: args.limit]
    seconds: dict[str, list[float]] = {s: [] for s in SANDBOXES}
    outcomes: dict[str, list[str]] = {s: [] for s in SANDBOXES}
    for i, (doc, completion) in enumerate((d, c) for d in docs for c in (d["canonical_solution"], WRONG)):
        program = utils.program(doc, completion)
        for box in SANDBOXES if i % 2 == 0 else SANDBOXES[::-1]:
            started = time.perf_counter()
            result = sandbox.run_program(program, timeout=utils.TIMEOUT_S, memory_mb=utils.MEMORY_MB, sandbox=box)
            seconds[box].append(time.perf_counter() - started)
            outcomes[box].append(result.outcome)
    old, new = seconds[SANDBOXES[0]], seconds[SANDBOXES[1]]
    diffs = [b - a for a, b in zip(old, new)]
    same = sum(a == b for a, b in zip(*outcomes.values()))
    report = {
        "machine": f"{platform.machine()}, {platform.node()}, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "programs": len(old),
        "per_program_ms": {box: {"median": 1000 * statistics.median(v), "mean": 1000 * statistics.mean(v),
                                 "p90": 1000 * percentile(v, 0.9)} for box, v in seconds.items()},
        "bwrap_minus_old_ms": {"median": 1000 * statistics.median(diffs), "mean": 1000 * statistics.mean(diffs)},
        "ratio_of_medians": statistics.median(new) / statistics.median(old),
        "probe_ms": 1000 * probe,
        "same_outcome": same,
        "passed": {box: v.count("passed") for box, v in outcomes.items()},
        "outcomes": {box: {o: v.count(o) for o in sorted(set(v))} for box, v in outcomes.items()},
    }
    print(f"{report['programs']} programs ({len(docs)} problems x reference + wrong), "
          f"{report['date']}, {report['machine']}")
    print("| runner | median ms | mean ms | p90 ms | passed |")
    print("| --- | --- | --- | --- | --- |")
    for box, t in report["per_program_ms"].items():
        print(f"| {box} | {t['median']:.0f} | {t['mean']:.0f} | {t['p90']:.0f} | {report['passed'][box]} |")
    print(f"bwrap - old per program: median {report['bwrap_minus_old_ms']['median']:+.0f} ms, "
          f"mean {report['bwrap_minus_old_ms']['mean']:+.0f} ms; ratio of medians {report['ratio_of_medians']:.2f}; "
          f"same outcome {same} of {len(old)}; outcomes {report['outcomes']}; "
          f"the probe (once per process) {report['probe_ms']:.0f} ms")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sandbox_bench.json").write_text(json.dumps(report, indent=2))
    return 0 if same == len(old) else 1


if __name__ == "__main__":
    raise SystemExit(main())
