"""Where the test suite's CPU goes: `make test`'s pytest run, with every Python process it starts
accounted for.

Runs `python -m pytest -q -n 2 --dist loadgroup --durations=N` (as `make test` does) with a
`sitecustomize` on `PYTHONPATH` that, when each Python process exits normally, appends its own
CPU seconds (user + system: `resource.getrusage(RUSAGE_SELF)`), its wall seconds, its command line
and the test that was running (`PYTEST_CURRENT_TEST`, which the tests' subprocesses inherit) to a
JSON-lines file. Not in it: processes that end by a signal (servers stopped by the tests, a
killed stage, Ray's workers), Python processes started with an environment of their own, without
that `PYTHONPATH` (DVC's daemons, some tests' tracking scripts), and processes that are not Python
(Chromium, git, Ray's raylet); the whole run's CPU beside it (`RUSAGE_CHILDREN`: pytest and the
descendants that were waited for) gives about how much that is.

    python -m bench.suite_cpu [--out bench/out/suite_cpu] [--durations 150] [-- PYTEST_ARGS...]

Prints the run's wall and CPU seconds, CPU seconds by kind of process (the pytest workers, model
and data stages, `dvc`, flows and Prefect, the rest), the stage processes by stage, and the tests
whose subprocesses used the most CPU; writes them with the raw lines to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_STAGES = ("collect", "clean", "decontam", "dedup", "validate", "tokenize")

# What each Python process runs at its start (Python imports `sitecustomize` from sys.path).
HOOK = '''
import atexit, json, os, resource, sys, time

_log, _started = os.environ.get("LLM_FORGE_SUITE_CPU_LOG"), time.monotonic()

def _write():
    r = resource.getrusage(resource.RUSAGE_SELF)
    line = {"argv": list(getattr(sys, "orig_argv", sys.argv))[:6], "wall": round(time.monotonic() - _started, 2),
            "cpu": round(r.ru_utime + r.ru_stime, 2), "test": os.environ.get("PYTEST_CURRENT_TEST", "")}
    try:
        with open(_log, "a") as f:
            f.write(json.dumps(line) + "\\n")
    except OSError:
        pass

if _log:
    atexit.register(_write)
'''


def cpu_model() -> str:
    """The CPU's model name, and whether it has AVX-512 (the suite's time differs by both)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()}, {'with' if ' avx512f' in info else 'without'} AVX-512"


def kind(argv: list[str], wall: float, run_wall: float) -> str:
    """The kind of process a logged command line is."""
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    if module == "pytest" or ("-c" in argv and wall > run_wall / 2):  # xdist's workers run `python -c`
        return "pytest (controller and workers)"
    if module and module.startswith("stages."):
        return "data stages" if module.removeprefix("stages.") in DATA_STAGES else "model stages"
    if module == "dvc" or any(Path(a).name == "dvc" for a in argv[1:2]):
        return "dvc"
    if module and module.split(".")[0] in ("flows", "prefect"):
        return "flows and Prefect"
    return "other"


def summary(lines: list[dict[str, Any]], run_wall: float, run_cpu: float) -> dict[str, Any]:
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    stages: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    tests: dict[str, float] = collections.defaultdict(float)
    for line in lines:
        k = kind(line["argv"], line["wall"], run_wall)
        kinds[k][0] += 1
        kinds[k][1] += line["cpu"]
        if k.endswith("stages"):
            name = line["argv"][line["argv"].index("-m") + 1].removeprefix("stages.")
            stages[name][0] += 1
            stages[name][1] += line["cpu"]
        if line["test"] and not k.startswith("pytest"):
            tests[line["test"].rsplit(" ", 1)[0]] += line["cpu"]
    logged = sum(v[1] for v in kinds.values())
    return {
        "wall_s": round(run_wall, 1), "cpu_s": round(run_cpu, 1), "logged_cpu_s": round(logged, 1),
        "unlogged_cpu_s": round(run_cpu - logged, 1), "processes": len(lines),
        "by_kind": {k: {"processes": n, "cpu_s": round(c, 1)}
                    for k, (n, c) in sorted(kinds.items(), key=lambda x: -x[1][1])},
        "stages": {k: {"processes": n, "cpu_s": round(c, 1), "per_process_s": round(c / n, 1)}
                   for k, (n, c) in sorted(stages.items(), key=lambda x: -x[1][1])},
        "tests_by_subprocess_cpu": {t: round(c, 1) for t, c in sorted(tests.items(), key=lambda x: -x[1])[:15]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/suite_cpu")
    ap.add_argument("--durations", type=int, default=150)
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hook_dir, log = args.out / "hook", args.out / "processes.jsonl"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    log.unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "LLM_FORGE_SUITE_CPU_LOG": str(log)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", f"--durations={args.durations}",
           *args.pytest_args]
    started = time.monotonic()
    with (args.out / "pytest.log").open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    result = {"command": " ".join(cmd), "exit_code": done.returncode,
              "machine": cpu_model(), "cpus": os.cpu_count(),
              **summary(lines, wall, children.ru_utime + children.ru_stime)}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
