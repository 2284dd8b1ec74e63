"""What every training stage shares: the `train` section, seeding, precision, resumable
checkpoints, training curves, multi-process launch, and the atomic model folder.

A training stage keeps its checkpoints in `<train.checkpoints>/<stage>/`, outside its DVC output
(which only appears, atomically, when the stage has finished). A checkpoint belongs to one
fingerprint: the stage's params and the DVC-visible inputs it read. When a stage is rerun after a
crash or kill with the same fingerprint it resumes from the last complete checkpoint; with another
fingerprint it starts afresh. `metrics.json` holds `resumed_from_step` (0 for a fresh start).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from stages.common.config import StageConfig, StageError
from stages.common.io import atomic_dir, write_json

log = logging.getLogger("llm_forge.training")

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainConfig(StageConfig):
    """The `train` section: how (not what) every training stage trains."""

    num_processes: int = Field(1, ge=1)
    """Processes (GPUs); above 1 the stage reruns itself under `accelerate launch`."""
    distributed: Literal["fsdp", "deepspeed"] = "fsdp"
    """Sharding used when num_processes > 1: `configs/accelerate/<name>.yaml`."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; auto is bf16 where the hardware has it (CUDA with bf16), else fp32."""
    checkpoints: Path = Path("checkpoints")
    """Where stages keep resumable checkpoints (not a DVC output; removed after success)."""
    keep_checkpoints: bool = False
    """Keep a stage's checkpoints after it has finished (for inspection)."""


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def resolve_precision(precision: str) -> str:
    """`fp32`, `bf16` or `fp16` for this machine."""
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def device() -> str:
    """This process's accelerator (one per process under `accelerate launch`), else the CPU."""
    import os

    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def train_model(trainer: Any, resume_path: Path | None) -> float | None:
    """`trainer.train()`, resumed from `resume_path` when there is one; returns the mean training
    loss. A checkpoint taken at the last step is restored without training: transformers would
    run one step past `max_steps` on it."""
    from transformers import TrainerState

    if resume_path is not None:
        state = TrainerState.load_from_json(str(Path(resume_path) / "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            trainer._load_from_checkpoint(str(resume_path))
            trainer.state = state
            return None
    return trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None).training_loss


def relaunch_if_distributed(stage: str, train: TrainConfig, argv: list[str]) -> int | None:
    """Rerun `python -m stages.<stage>` under `accelerate launch` when more than one process is
    configured and we are not already one of them; returns its exit code, else None."""
    if train.num_processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    import torch

    if not torch.cuda.is_available():
        # accelerate would start N independent CPU copies racing on one output folder.
        raise StageError("train.num_processes > 1 needs CUDA GPUs; set it to 1 on this machine")
    config = ACCELERATE_CONFIGS / f"{train.distributed}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(train.num_processes), "-m", f"stages.{stage}", *argv]
    log.info("launching %d processes: %s", train.num_processes, " ".join(cmd))
    return subprocess.call(cmd)


def fingerprint(*parts: Any) -> str:
    """A short hash of params and input descriptions (JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dir_signature(path: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the files under `path`: cheap, and changes when DVC rewrites it."""
    path = Path(path)
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


class Checkpoints:
    """The checkpoint folder of one stage run, tied to a fingerprint."""

    def __init__(self, train: TrainConfig, stage: str, print_: str) -> None:
        self.dir = Path(train.checkpoints) / stage
        self.keep = train.keep_checkpoints
        marker = self.dir / "fingerprint"
        if self.dir.exists() and (not marker.exists() or marker.read_text().strip() != print_):
            log.info("%s: params or inputs changed since the last checkpoint: starting afresh", stage)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(print_ + "\n")

    def last(self) -> tuple[Path | None, int]:
        """The newest complete checkpoint and its step (None, 0 when there is none)."""
        found = []
        for p in self.dir.iterdir() if self.dir.exists() else ():
            m = CHECKPOINT.match(p.name)
            # COMPLETE: our own loops' marker; trainer_state.json: the last file HF Trainer writes
            if m and p.is_dir() and ((p / "COMPLETE").exists() or (p / "trainer_state.json").exists()):
                found.append((int(m.group(1)), p))
        if not found:
            return None, 0
        step, path = max(found)
        return path, step

    def path(self, step: int) -> Path:
        return self.dir / f"checkpoint-{step}"

    def mark_complete(self, path: Path) -> None:
        (path / "COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    def finish(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


class Curves:
    """Training curves: each logged row goes to MLflow (as step metrics, when a run is active)
    and to `reports/<stage>/curves.csv` (DVC plots)."""

    def __init__(self, report_dir: Path, name: str = "curves.csv") -> None:
        self.path = Path(report_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        self.rows: list[dict[str, float]] = []
        if self.path.exists():  # a resumed run continues its curve
            with self.path.open() as f:
                self.rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.rows and self.rows[-1]["step"] == step:  # train and eval rows of one step merge
            self.rows[-1].update(row)
        else:
            self.rows = [r for r in self.rows if r["step"] < step] + [{"step": float(step), **row}]
        self._write()
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        except Exception as err:  # a curve point is not worth failing a training run over
            log.debug("mlflow curve logging failed: %s", err)

    def truncate(self, step: int) -> None:
        """Forget points after `step` (they belong to a run that did not reach its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._write()

    def _write(self) -> None:
        cols = sorted({k for r in self.rows for k in r} - {"step"})
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", *cols])
            w.writeheader()
            for r in self.rows:
                w.writerow({"step": int(r["step"]), **{k: r.get(k, "") for k in cols}})


def trainer_callback(curves: Curves) -> Any:
    """A transformers `TrainerCallback` that sends every log row to `curves`."""
    from transformers import TrainerCallback

    class CurvesCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and state.is_world_process_zero:
                curves.log(state.global_step, logs)

    return CurvesCallback()


def save_model(final: Path, stage: str, cfg: StageConfig, metrics: dict[str, Any], model: Any,
               tokenizer: Any | None = None) -> None:
    """The model folder, atomically, with the resolved config and the metrics beside it."""
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "llm_forge.yaml").write_text(yaml.safe_dump({stage: cfg.model_dump(mode="json")}, sort_keys=False))
        write_json(tmp / "metrics.json", metrics)
