"""What every training stage shares: the `train` section, seeding, precision, resumable
checkpoints, training curves, multi-process launch, and the atomic model folder.

Same commit, params and kind of machine, same bytes: `seed_everything` seeds every generator and
makes torch pick deterministic kernels, and `save_model` keeps a model folder free of anything a
rerun changes: the run's timings and thread count stay in `reports/<stage>/` (`model_metrics`
leaves them out of the folder's `metrics.json`) and `stable_safetensors` writes each safetensors header in one order.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from stages.common.atomic import atomic_file
from stages.common.config import StageConfig, StageError
from stages.common.io import atomic_dir, write_json

log = logging.getLogger("llm_forge.training")

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "loop_state.json"  # our own counters, beside accelerate's files in a checkpoint


class TrainConfig(StageConfig):
    """The `train` section: how (not what) every training stage trains."""

    num_processes: int = Field(ge=1)
    """Processes (GPUs) on all machines together; above 1 the stage reruns itself under
    `accelerate launch`."""
    num_machines: int = Field(ge=1)
    """Machines the processes are spread over. Above 1, every machine runs the same stage command
    with NODE_RANK (0 on the main machine), MASTER_ADDR and MASTER_PORT (the main machine's
    address and a free port) set, the names torchrun and SLURM scripts use."""
    distributed: Literal["fsdp", "deepspeed", "deepspeed_zero2"]
    """Sharding used when num_processes > 1: `configs/accelerate/<name>.yaml` (FSDP, DeepSpeed
    ZeRO-3, DeepSpeed ZeRO-2)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    """Compute precision; auto is bf16 where the hardware has it (CUDA with bf16), else fp32."""
    checkpoints: Path
    """Where stages keep resumable checkpoints (not a DVC output; removed after success)."""
    keep_checkpoints: bool
    """Keep a stage's checkpoints after it has finished (for inspection)."""

    def relaunch(self, stage: str, argv: list[str]) -> int | None:
        """The runner's hook: `relaunch_if_distributed` with this section."""
        return relaunch_if_distributed(stage, self, argv)


class Lora(StageConfig):
    """Low-rank adapters (peft), the same in every training stage; merged before saving."""

    r: int = Field(ge=1)
    """Rank of each adapter."""
    alpha: int = Field(ge=1)
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: str | list[str]
    """Layers that get adapters: `all-linear` or a list of module names (q_proj, v_proj, ...)."""


def peft_config(lora: Lora, task_type: str) -> Any:
    """The `peft.LoraConfig` of `lora` for `task_type` (CAUSAL_LM, SEQ_CLS)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)


class TrainerKnobs(StageConfig):
    """The knobs of a stage trained by a Hugging Face `Trainer` (sft, reward, dpo), by their HF names."""

    learning_rate: float = Field(gt=0)
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(ge=0, lt=1)
    """Share of the steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(ge=1)
    """Records per device per micro-batch."""
    gradient_accumulation_steps: int = Field(ge=1)
    """Micro-batches whose gradients add up before each optimizer step."""
    num_train_epochs: float = Field(gt=0)
    """Passes over the training records (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(ge=1)
    """Stop after this many optimizer steps (null: `num_train_epochs` decides)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass: less memory, more time."""
    lora: Lora
    """The adapters, when `method` trains adapters."""
    val_fraction: float = Field(ge=0, lt=1)
    """Share of records held out (by a salted hash of the id) to measure the stage's metric."""
    split_salt: str
    """Salt of the id hash that assigns records to train or held-out; change it to reshuffle."""
    eval_steps: int | None = Field(ge=1)
    """Also evaluate on the held-out records every this many steps (null: only before and after)."""
    logging_steps: int = Field(ge=1)
    """Steps between two points of the training curve."""
    save_steps: int = Field(ge=1)
    """Steps between two resumable checkpoints."""
    save_total_limit: int = Field(ge=1)
    """Checkpoints kept while training (older ones are deleted)."""
    seed: int
    """Seed of weight init (adapters, heads), data order and dropout."""


class TrainerStageConfig(TrainerKnobs):
    """The Trainer knobs of a stage that tokenizes its own records (sft, reward)."""

    max_length: int = Field(ge=8)
    """Longest rendered prompt + answer in tokens."""
    group_by_length: bool
    """Batch records of similar length together (much less padding; the order is still seeded)."""


def trainer_arguments(args_cls: type, cfg: TrainerKnobs, output_dir: Path, precision: str,
                      has_eval: bool, **extra: Any) -> Any:
    """`args_cls` (a TRL config class) with every shared knob of `cfg` set; `extra` adds to them
    or replaces them."""
    import torch

    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # below 1: a share of the steps
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1,
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps and has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=device() == "cpu",  # transformers refuses bf16 on a CPU unless told it is the device
    )
    if isinstance(cfg, TrainerStageConfig):
        args.update(max_length=cfg.max_length,
                    train_sampling_strategy="group_by_length" if cfg.group_by_length else "random")
    return args_cls(**{**args, **extra})


def count_parameters(model: Any) -> dict[str, int]:
    """`parameters` and `trainable_parameters`: the names every training stage reports them by."""
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def loss_figures(trainer: Any, train_loss: float | None) -> dict[str, Any]:
    """A Trainer's steps, its train loss, and the first and last loss it logged (a stage's metrics)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "train_loss": rounded(train_loss),
            "first_logged_loss": rounded(losses[0]) if losses else None,
            "last_logged_loss": rounded(losses[-1]) if losses else None}


# Dense bf16 peak TFLOP/s per GPU, for the MFU estimate (first match of the device name wins).
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_flops(precision: str) -> float | None:
    """Peak FLOP/s of one accelerator for MFU; None on CPU or an unknown GPU."""
    import torch

    if not torch.cuda.is_available() or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS_BF16.items() if key in name), None)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device), and have torch use deterministic kernels
    where it has a choice (cuDNN, cuBLAS's workspace, scatter/index ops): on one kind of machine a
    rerun gives the same weights. An op with no deterministic kernel warns rather than fails
    (none of the CPU ops the stages use); the CPU's thread count is the machine's
    (`torch.get_num_threads()`, recorded in the stages' metrics and in a registered version)."""
    import torch
    from transformers import set_seed

    # read by cuBLAS when it first starts: a fixed workspace makes its GEMMs deterministic on GPUs
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
    cmd = launch_command(stage, train, argv)
    log.info("launching %d processes: %s", train.num_processes, " ".join(cmd))
    return subprocess.call(cmd)


def launch_command(stage: str, train: TrainConfig, argv: list[str],
                   env: Mapping[str, str] = os.environ) -> list[str]:
    """The `accelerate launch` command of a distributed run of `stages.<stage>`: the accelerate
    config of `train.distributed`, all machines' processes, and on several machines this machine's
    rank and the main machine's address from NODE_RANK, MASTER_ADDR and MASTER_PORT."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / f"{train.distributed}.yaml"),
           "--num_processes", str(train.num_processes)]
    if train.num_machines > 1:
        missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise StageError(f"train.num_machines is {train.num_machines}: set {', '.join(missing)} on every "
                             "machine (NODE_RANK 0 on the main one, MASTER_ADDR and MASTER_PORT its address)")
        cmd += ["--num_machines", str(train.num_machines), "--machine_rank", env["NODE_RANK"],
                "--main_process_ip", env["MASTER_ADDR"], "--main_process_port", env["MASTER_PORT"]]
    return [*cmd, "-m", f"stages.{stage}", *argv]


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
    return [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, int(p.stat().st_mtime))
            for p in files]


def resume_fingerprint(stage: str, cfg: StageConfig, train: TrainConfig, *inputs: Path) -> str:
    """What a checkpoint belongs to: the stage's params, how it trains (process count, sharding,
    the precision this machine resolves to) and the files it read. Another value of any of them
    makes a checkpoint unusable."""
    how = train.model_dump(mode="json", include={"num_processes", "distributed"})
    return fingerprint(stage, cfg.model_dump(mode="json"), how, resolve_precision(train.precision),
                       *(dir_signature(p) for p in inputs))


class Checkpoints:
    """The checkpoint folder of one stage run, tied to its `resume_fingerprint`; a folder made
    under another fingerprint is removed (on the main process: the others find it matching)."""

    def __init__(self, train: TrainConfig, stage: str, cfg: StageConfig, *inputs: Path, main: bool = True) -> None:
        self.dir = Path(train.checkpoints) / stage
        self.keep = train.keep_checkpoints
        print_ = resume_fingerprint(stage, cfg, train, *inputs)
        marker = self.dir / "fingerprint"
        if not main:
            return
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

    def begin(self, step: int) -> Path:
        """The folder for the checkpoint of `step`, emptied of a half-written one from a killed run."""
        path = self.dir / f"checkpoint-{step}"
        if path.exists():
            shutil.rmtree(path)
        return path

    def commit(self, path: Path, curves: Curves | None) -> None:
        """Seal a written checkpoint: the curve so far beside it, COMPLETE last (a checkpoint
        killed half-way is never resumed from), then only this newest one is kept."""
        path.mkdir(parents=True, exist_ok=True)
        if curves is not None and curves.path.exists():
            shutil.copy2(curves.path, path / "curves.csv")
        (path / "COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        for old in self.dir.glob("checkpoint-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", path)

    def save_accelerate(self, accelerator: Any, step: int, curves: Curves | None, state: dict[str, Any]) -> Path:
        """A checkpoint of an accelerate loop: model, optimizer, scheduler and RNG states (on every
        process: sharded states are saved collectively) and our own counters (`STATE_FILE`),
        sealed by `commit` on the main process."""
        path = self.begin(step) if accelerator.is_main_process else self.dir / f"checkpoint-{step}"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            (path / STATE_FILE).write_text(json.dumps(state) + "\n")
            self.commit(path, curves)
        accelerator.wait_for_everyone()
        return path

    def finish(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def restore_curves(checkpoint: Path | None, report_dir: Path) -> None:
    """Put the curve saved with `checkpoint` back in the report folder, so a resumed run
    continues the curve the killed run had drawn up to its checkpoint."""
    saved = checkpoint / "curves.csv" if checkpoint is not None else None
    if saved is not None and saved.exists():
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy2(saved, Path(report_dir) / "curves.csv")


class Curves:
    """Training curves: each logged row goes to MLflow (as step metrics, when a run is active)
    and to `reports/<stage>/curves.csv` (DVC plots)."""

    def __init__(self, report_dir: Path, name: str = "curves.csv", prefix: str = "") -> None:
        self.path = Path(report_dir) / name
        self.prefix = prefix  # of the MLflow keys, where one stage trains two models (`judge/loss`)
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
                mlflow.log_metrics({self.prefix + k: v for k, v in row.items() if k != "step"}, step=step)
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


def train_with_curves(trainer: Any, curves: Curves, resume: Path | None, resume_step: int, main: bool,
                      first_point: dict[str, float | None]) -> float | None:
    """`train_model` with the curve kept in step: a fresh run starts a new curve at `first_point`
    (the held-out metric before training), a resumed one continues the curve to its checkpoint."""
    if main:
        curves.truncate(resume_step if resume is not None else -1)
        if resume is None:
            curves.log(0, {k: v for k, v in first_point.items() if v is not None})
    trainer.add_callback(trainer_callback(curves))
    return train_model(trainer, resume)


def split_counts(docs_in: int, train: list[Any], val: list[Any], dropped: dict[str, int]) -> dict[str, Any]:
    """The record counts of a training stage, in the data stages' vocabulary."""
    return {"docs_in": docs_in, "docs_out": len(train) + len(val), "dropped": dict(sorted(dropped.items())),
            "train_records": len(train), "val_records": len(val)}


# Metrics keys that describe the run, not the model (wall time, throughput, utilisation, the
# machine's thread count): they differ from run to run or machine to machine, so they stay in
# the report folder and never enter a model folder.
RUN_KEYS = re.compile(r"(^|_)(seconds|per_second|runtime|time|mfu|speedup|threads)$")


def model_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without what describes the run (`RUN_KEYS`, at any depth): what a model folder keeps."""
    return {k: model_metrics(v) if isinstance(v, dict) else v for k, v in metrics.items() if not RUN_KEYS.search(k)}


def threads() -> int:
    """torch's CPU threads in this process: results of CPU kernels can depend on it, so the
    training stages record it in their report."""
    import torch

    return torch.get_num_threads()


def stable_safetensors(folder: Path) -> None:
    """Rewrite the header of every `*.safetensors` file under `folder` in one order (the
    `__metadata__` keys sorted, the tensors in the order of their data), so that equal tensors and
    metadata give equal bytes. safetensors keeps the metadata in a hash map, whose order changes
    from process to process: a file with several metadata keys (torchao's tensor subclasses,
    described key by key) otherwise differs on every save. The tensor data are not touched."""
    import struct

    for path in sorted(Path(folder).rglob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        if meta is not None:
            ordered = {"__metadata__": dict(sorted(meta.items())), **ordered}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
        if text == raw:
            continue
        with atomic_file(path) as tmp, path.open("rb") as src, tmp.open("wb") as dst:
            src.seek(8 + size)
            dst.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(src, dst, 1 << 20)


def save_model(final: Path, stage: str, cfg: StageConfig, metrics: dict[str, Any], model: Any,
               tokenizer: Any | None = None) -> None:
    """The model folder, atomically, with the resolved config and the metrics beside it (without
    the run's timings: the same training gives the same folder, byte for byte)."""
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        stable_safetensors(tmp)
        (tmp / "llm_forge.yaml").write_text(yaml.safe_dump({stage: cfg.model_dump(mode="json")}, sort_keys=False))
        write_json(tmp / "metrics.json", model_metrics(metrics))


def load_trainable_lm(folder: Path, method: str, precision: str, stage: str) -> Any:
    """The causal LM a stage trains: full precision, or 4-bit NF4 for `qlora` (bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device())
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=compute,
                                                     device_map={"": device()})
    except (ImportError, RuntimeError, ValueError) as err:
        raise StageError(f"{stage}.method qlora: cannot load {folder} in 4-bit NF4 on this machine ({err}); "
                         "use method lora or full, or a machine where bitsandbytes runs") from err
    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 inference kernel the first time a CPU
    # forward runs without grad (a held-out eval); that kernel has no backward and needs dims
    # divisible by 32, so training after an eval would break: keep the trainable layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merged_lm(trainer: Any, method: str, base: Path, scratch: Path) -> Any:
    """The trained causal LM as a plain full-precision model: adapters merged into a base loaded
    in full precision (for qlora the 4-bit base is not what a stage ships)."""
    import torch
    from transformers import AutoModelForCausalLM

    trainer.save_model(str(scratch))  # gathers sharded weights; adapters only for lora/qlora
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).to(device())
    from peft import PeftModel

    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device())
    return PeftModel.from_pretrained(full, scratch, torch_dtype=torch.float32).merge_and_unload()
