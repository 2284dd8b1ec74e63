"""What the cached reference log-probs save: a beta-only DPO experiment against the whole chain.

Copies the project into a scratch git + DVC repository (the code, `dvc.yaml`, `params.yaml` with
`--profile` applied, the extracted assets linked), then, through DVC as a user runs it:

1. `dvc repro dpo`: the whole chain up to the dpo stage (collect ... sft, reference, dpo);
2. `dvc exp run -S dpo.beta=<beta> dpo`: an experiment that changes only dpo's beta; DVC reruns
   dpo and not the reference pass, whose output it has cached;

and prints the wall time of each, the stages each ran, and the reference and dpo stages' own
seconds (their metrics.json): what the experiment would also pay if the reference model ran again.

    python -m bench.reference_bench [--profile profiles/tiny.yaml] [--beta 0.2] [--out bench/out/reference]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stages.common.profile import apply

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("stages", "flows", "configs", "dvc.yaml", "params.yaml", "profiles", ".dvcignore")


def sh(project: Path, *cmd: str) -> tuple[float, str]:
    """Run `cmd` in `project` with this interpreter's tools first on PATH: (seconds, output)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def ran(output: str) -> list[str]:
    """The stages DVC ran, in order, from its output."""
    return re.findall(r"Running stage '([^']+)'", output)


def stage_seconds(project: Path, stage: str) -> float:
    return json.loads((project / "reports" / stage / "metrics.json").read_text())["seconds"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reference_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=None, help="a profile to apply (default: params.yaml as it is)")
    ap.add_argument("--beta", type=float, default=0.2, help="the experiment's dpo.beta")
    ap.add_argument("--out", type=Path, default=Path("bench/out/reference"))
    args = ap.parse_args(argv)
    project = args.out.resolve() / "project"
    shutil.rmtree(project.parent, ignore_errors=True)
    project.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, project / name)
    (project / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    if args.profile is not None:
        apply(ROOT / args.profile, project / "params.yaml", project / "params.yaml")
    (project / ".gitignore").write_text("/assets\n/checkpoints\n/mlflow.db\n/mlartifacts\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@llm-forge"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "bench project"]):
        sh(project, *cmd)

    chain, out = sh(project, "dvc", "repro", "dpo")
    chain_stages = ran(out)
    reference, dpo = stage_seconds(project, "reference"), stage_seconds(project, "dpo")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "the chain up to dpo")
    experiment, out = sh(project, "dvc", "exp", "run", "-S", f"dpo.beta={args.beta}", "dpo")
    experiment_stages = ran(out)
    dpo_again = stage_seconds(project, "dpo")

    print(f"profile: {args.profile or 'params.yaml (demo)'}")
    print(f"whole chain (dvc repro dpo): {chain:.1f} s, stages {chain_stages}")
    print(f"  of which reference {reference:.1f} s, dpo {dpo:.1f} s (their metrics.json)")
    print(f"beta-only experiment (dvc exp run -S dpo.beta={args.beta} dpo): {experiment:.1f} s, "
          f"stages {experiment_stages} (dpo {dpo_again:.1f} s)")
    print(f"experiment / whole chain: {experiment / chain:.3f}; without the cache it would also run the "
          f"reference pass: about {experiment + reference:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
