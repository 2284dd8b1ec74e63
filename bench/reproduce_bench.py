"""Time to reproduce a registered model, from the sources and from sft, beside the run that made it.

As a new user would (issue 22): a fresh `git clone` of this checkout's HEAD with the profile
applied and committed, `python -m flows.pipeline`, `dvc push` to a local remote; then a second
fresh clone with the same remote and MLflow store runs `python -m flows.reproduce
models:/llm-forge/1` (every stage that made the model, from the sources), then the same with
`--from sft`. Reports each step's wall seconds and exit code, the reproduce verdicts, and each
reproduce's time as a share of the pipeline run's (measured one after the other on the same
machine, the ratio survives a busy machine better than the seconds do).

    python -m bench.reproduce_bench [--profile tiny|demo] [--out bench/out/reproduce] [--keep]

`demo` runs `params.yaml` as it is (the whole demo pipeline, then its rebuilds: about half an hour
on an idle 2-core machine); `tiny` applies `profiles/tiny.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "models:/llm-forge/1"


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` in {cwd} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-2000:]}")
    return done


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(["git", "-c", "user.name=llm-forge bench", "-c", "user.email=bench@llm-forge.invalid", *args], cwd)


def checkout(src: Path, dest: Path, remote: Path) -> Path:
    """A fresh clone of `src` with `make setup`'s assets (linked) and the DVC remote."""
    git(dest.parent, "clone", "-q", str(src), str(dest))
    (dest / "assets").symlink_to((ROOT / "assets").resolve(), target_is_directory=True)
    (dest / ".git" / "info" / "exclude").write_text("/assets\n")
    sh([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "store", str(remote)], dest)
    return dest


def env_for(project: Path, store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("LLM_FORGE_PARENT_RUN_ID", None)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    log.write_text(done.stdout + done.stderr)
    verdict = next((line for line in reversed(done.stdout.splitlines()) if "outputs" in line), "")
    return {"command": " ".join(cmd[1:]), "seconds": seconds, "exit": done.returncode, "verdict": verdict,
            "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reproduce_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=["tiny", "demo"], default="tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/reproduce")
    ap.add_argument("--keep", action="store_true", help="keep the two checkouts (their reports, models, MLflow store)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    remote = work / "remote"
    remote.mkdir()
    head = git(ROOT, "rev-parse", "HEAD").stdout.strip()

    project = checkout(ROOT, work / "project", remote)
    if args.profile == "tiny":
        sh([sys.executable, "-m", "stages.common.profile", "profiles/tiny.yaml"], project)
        git(project, "commit", "-q", "-am", "the tiny profile")
    env = env_for(project, project)
    steps = {"pipeline": timed([sys.executable, "-m", "flows.pipeline"], project, env, out / "pipeline.log")}
    if steps["pipeline"]["exit"] != 0:
        raise SystemExit(f"the pipeline failed: see {out / 'pipeline.log'}")
    sh([sys.executable, "-m", "dvc", "push", "-q"], project, env)

    clone = checkout(project, work / "clone", remote)
    env = env_for(clone, project)  # the registry is the first checkout's store
    steps["reproduce"] = timed([sys.executable, "-m", "flows.reproduce", MODEL], clone, env, out / "reproduce.log")
    steps["reproduce --from sft"] = timed([sys.executable, "-m", "flows.reproduce", MODEL, "--from", "sft"], clone,
                                          env, out / "reproduce-from-sft.log")
    pipeline = steps["pipeline"]["seconds"]
    for step in steps.values():
        step["share_of_pipeline"] = round(step["seconds"] / pipeline, 2)
    result = {"profile": args.profile, "commit": head, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "load_average_after": os.getloadavg(), "steps": steps}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| step | seconds | share of the pipeline run | exit | verdict |", "|---|---:|---:|---:|---|"]
    lines += [f"| `{name}` | {s['seconds']:.0f} | {s['share_of_pipeline']:.2f} | {s['exit']} | {s['verdict']} |"
              for name, s in steps.items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["exit"] == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
