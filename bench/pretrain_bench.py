"""Pretrain throughput: the pretrain stage's training loop against a plain `transformers.Trainer`.

Both sides train the same model (SmolLM2-135M from `models/base/` when it is there, else a
random-init Llama of the same shape, which the output says) on the same blocks (the demo's
`data/tokenized/` train split cut to `--seq-len` tokens; random ids when it is missing), with the
same batch, steps, optimizer (fused AdamW), schedule, clipping and precision, one after the other
in one process. Side (a) calls the stage's own `run()` (model load, accelerate loop, final save);
side (b) is `Trainer.train()`. Each side's step ends are marked (the stage's per-step log line, the
Trainer's `on_step_end`), so a step's time runs from the previous step's end to its own and
includes fetching the batch on both sides. The first `--warmup` steps are left out (allocator and
kernel warm-up). Both wall-clock tokens/s and tokens per CPU-second (process CPU time: less
sensitive to other programs on a shared machine) are reported. The pair runs `--repeats` times in
alternating order (AB, BA, ...); each ratio is the geometric mean of the repeats' stage/Trainer
ratios, which cancels a steady drift over an even number of repeats. On a GPU the
MFU of each side is estimated as 6 x parameters x tokens/s over the GPU's peak bf16 FLOP/s.
The goal is stage tokens/s >= Trainer tokens/s (ratio >= 1.0).

    python -m bench.pretrain_bench [--steps 5] [--warmup 1] [--batch-size 2] [--seq-len 256]
                                   [--repeats 2] [--threads N] [--out bench/out/pretrain]

On a GPU, the same command measures bf16 throughput and the stage's MFU, e.g.
`python -m bench.pretrain_bench --steps 30 --warmup 5 --batch-size 16 --seq-len 1024 --compile`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.config import Paths, load_section, overlay, read_yaml
from stages.common.io import write_json
from stages.common.training import TrainConfig, peak_flops, resolve_precision
from stages.pretrain import PretrainConfig, run

PARAMS = read_yaml(Path(__file__).resolve().parents[1] / "params.yaml")


def stage_config(args: argparse.Namespace) -> PretrainConfig:
    """params.yaml's pretrain section in the benchmark's shape; the Trainer side copies it."""
    changes = dict(max_steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=1,
                   lr_scheduler_type="linear", warmup_ratio=0.0, save_steps=0, eval_batches=0, logging_steps=1,
                   shuffle=False, compile=args.compile, method="full")
    return load_section(PretrainConfig, "pretrain", {"pretrain": overlay(PARAMS["pretrain"], changes, "pretrain")})


def train_config(work: Path, precision: str) -> TrainConfig:
    changes = {"checkpoints": str(work / "checkpoints"), "precision": precision}
    return load_section(TrainConfig, "train", {"train": overlay(PARAMS["train"], changes, "train")})


def cut_blocks(tokenized: Path, seq_len: int, n_blocks: int, vocab: int, seed: int) -> tuple[np.ndarray, str]:
    """`n_blocks` blocks of `seq_len` tokens from the demo's train split, or random ids."""
    if (tokenized / "dataset_dict.json").exists():
        import datasets

        train = datasets.load_from_disk(str(tokenized))["train"].with_format("numpy")
        rows = max(1, n_blocks * seq_len // len(train[0]["input_ids"]) + 1)
        flat = np.asarray(train[:rows]["input_ids"]).reshape(-1)
        if flat.size >= n_blocks * seq_len and flat.max() < vocab:
            return flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).astype(np.int32), f"{tokenized} (train split)"
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(n_blocks, seq_len), dtype=np.int32), "random token ids"


def prepare(args: argparse.Namespace, work: Path) -> tuple[Paths, str, str]:
    """A scratch project: the base model folder and a tokenized DatasetDict of the bench's blocks."""
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = Path(".")
    paths = Paths(**{k: work / k for k in Paths.model_fields})
    if (args.model / "config.json").exists():
        # A private copy: a pipeline run that rewrites models/base meanwhile cannot pull it away.
        shutil.copytree(args.model, paths.base)
        config = AutoConfig.from_pretrained(paths.base)
        model_desc = (f"{config.architectures[0]} from {args.model} "
                      f"({config.num_hidden_layers} layers, hidden {config.hidden_size})")
    else:  # SmolLM2-135M's shape, random init
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(args.seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(paths.base)
        model_desc = "random-init Llama of SmolLM2-135M's shape (models/base/ not found)"

    n_blocks = args.batch_size * args.steps + args.batch_size
    blocks, data_desc = cut_blocks(root / "data/tokenized", args.seq_len, n_blocks, config.vocab_size, args.seed)

    def as_ds(arr: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"input_ids": arr.tolist()})

    datasets.DatasetDict({"train": as_ds(blocks[:-args.batch_size]), "val": as_ds(blocks[-args.batch_size:])}) \
        .save_to_disk(str(paths.tokenized))
    tok_dir = root / "data/tokenized/tokenizer"
    if tok_dir.exists():
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(paths.tokenized / "tokenizer")
    else:
        from stages.tokenize import TokenizeConfig, train_bpe

        bpe = load_section(TokenizeConfig, "tokenize", PARAMS).bpe
        train_bpe(["hello world"] * 10, 300, bpe).save_pretrained(paths.tokenized / "tokenizer")
    return paths, model_desc, data_desc


Mark = tuple[float, float]  # (wall clock, process CPU time) at the end of a step


def now(cuda: bool) -> Mark:
    if cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def stage_side(args: argparse.Namespace, paths: Paths, work: Path) -> list[Mark]:
    """Step-end marks of the pretrain stage's run(): taken when it logs its per-step line."""
    import logging

    import torch

    cfg = stage_config(args)
    cuda = torch.cuda.is_available()
    marks: list[Mark] = []

    class StepClock(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("step "):
                marks.append(now(cuda))

    logger = logging.getLogger("llm_forge.pretrain")
    clock, level = StepClock(), logger.level
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    try:
        run(cfg, paths, train_config(work, args.precision))
    finally:
        logger.removeHandler(clock)
        logger.setLevel(level)
    return marks


def trainer_side(args: argparse.Namespace, paths: Paths, work: Path) -> list[Mark]:
    """Step-end marks of a plain transformers.Trainer on the same model, data and settings."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    precision = resolve_precision(args.precision)
    cfg = stage_config(args)
    cuda = torch.cuda.is_available()
    train = datasets.load_from_disk(str(paths.tokenized))["train"]
    train = train.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    model = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    model.config.use_cache = False
    marks: list[Mark] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(now(cuda))

    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=0, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1],
        max_grad_norm=cfg.max_grad_norm, optim="adamw_torch_fused", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
        use_cpu=not cuda, bf16=precision == "bf16", fp16=precision == "fp16", torch_compile=args.compile,
        disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator,
            callbacks=[StepClock()]).train()
    return marks


def safetensors_tensors(folder: Path) -> list[Any]:
    from safetensors.torch import load_file

    return [t for f in sorted(folder.glob("*.safetensors")) for t in load_file(f).values()]


def machine() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()}-core {cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pretrain_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/base"), help="model folder (else random init)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per side, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides (GPU)")
    ap.add_argument("--repeats", type=int, default=2, help="run the pair this many times, alternating the order")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/pretrain"))
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    # The stage's curves send each point to MLflow when a run is active; the first point imports
    # mlflow, which the runner has already done in a real stage run. Do it here, outside the timing.
    import mlflow  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        work = Path(tmp)
        paths, model_desc, data_desc = prepare(args, work)
        n_params = sum(t.numel() for t in safetensors_tensors(paths.base))
        sides = {"stage": stage_side, "trainer": trainer_side}
        wall: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        tokens = args.batch_size * args.seq_len
        for r in range(args.repeats):
            order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
            for name, side in order:
                marks = side(args, paths, work)
                assert len(marks) == args.steps, f"{name}: {len(marks)} step marks for {args.steps} steps"
                # Step k's time runs from step k-1's end to step k's: the first step (warm-up) has
                # no start mark, and --warmup > 1 drops more.
                timed = marks[args.warmup - 1:]
                secs = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
                cpus = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
                wall[name].append(tokens * len(secs) / sum(secs))
                cpu[name].append(tokens * len(cpus) / sum(cpus))
                print(f"{name}: timed steps {[round(t, 2) for t in secs]} s wall, {[round(t, 2) for t in cpus]} s CPU"
                      f" -> {wall[name][-1]:.1f} tokens/s, {cpu[name][-1]:.1f} tokens per CPU-second", flush=True)

    def summary_of(runs: dict[str, list[float]]) -> dict[str, Any]:
        # Each repeat ran the two sides back to back, so their ratio shares that moment's machine
        # load; the order alternates (AB, BA, ...), so the geometric mean over an even number of
        # repeats cancels a steady drift (a process that speeds up as it warms, load that fades).
        pairs = [a / b for a, b in zip(runs["stage"], runs["trainer"])]
        return {"stage": round(statistics.median(runs["stage"]), 1),
                "trainer": round(statistics.median(runs["trainer"]), 1),
                "ratio": round(statistics.geometric_mean(pairs), 3), "pair_ratios": [round(x, 3) for x in pairs],
                "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}}

    summary = {
        "command": "python -m bench.pretrain_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "model": model_desc, "data": data_desc,
        "precision": resolve_precision(args.precision), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "timed_steps": args.steps - args.warmup, "repeats": args.repeats,
        "tokens_per_second": summary_of(wall),
        "tokens_per_cpu_second": summary_of(cpu),
    }
    peak = peak_flops(resolve_precision(args.precision))
    summary["mfu"] = ({k: round(6 * n_params * summary["tokens_per_second"][k] / peak, 4) for k in sides}
                      if peak else None)
    write_json(args.out / "results.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
