"""ppo: tune the SFT policy against the reward model with PPO, RLOO or GRPO (TRL).

Reads `models/sft/` (the policy and the reference it is kept near), `models/reward/` and the prompts
of `data/dedup/instructions/`. Writes `models/ppo/` and `reports/ppo/` (`metrics.json`: reward on
held-out prompts before and after, `stopped_early`; `curves.csv`; `samples.jsonl`). README's
"Aligning the model" says what each `algorithm` optimizes.

    python -m stages.ppo [--params params.yaml]
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common import rl
from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import read_records, write_jsonl
from stages.common.lm import greedy
from stages.common.runner import run_stage
from stages.common.training import (
    Checkpoints,
    Curves,
    Lora,
    TrainConfig,
    count_parameters,
    peft_config,
    resolve_precision,
    restore_curves,
    rounded,
    save_model,
    seed_everything,
    split_counts,
    threads,
)

log = logging.getLogger("llm_forge.ppo")


class PpoConfig(StageConfig):
    """The `ppo` section: reinforcement learning from the reward model's scores."""

    algorithm: Literal["ppo", "rloo", "grpo"]
    """ppo: TRL's PPOTrainer with a value model; rloo / grpo: TRL's critic-free RLOO / GRPO."""
    method: Literal["full", "lora"]
    """full: every weight of the policy trains; lora: low-rank adapters, merged before saving."""
    lora: Lora
    """The adapters, when `method` is lora."""
    updates: int = Field(ge=1)
    """Policy updates; each samples responses to `batch_size` prompts and optimises on them."""
    batch_size: int = Field(ge=2)
    """Prompts per update (per process)."""
    num_generations: int = Field(ge=2)
    """RLOO / GRPO: responses sampled per prompt, the group its baseline is taken over (PPO: one)."""
    epochs_per_update: int = Field(ge=1)
    """Optimisation passes over each batch of responses (PPO num_ppo_epochs, RLOO/GRPO num_iterations)."""
    learning_rate: float = Field(gt=0)
    """AdamW learning rate of the policy (and of the value model for PPO)."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"]
    """Learning-rate schedule over the updates."""
    kl_coef: float = Field(ge=0)
    """Weight of the KL penalty towards the SFT policy (PPO kl_coef, RLOO/GRPO beta)."""
    cliprange: float = Field(gt=0)
    """Clip range of the policy ratio (PPO cliprange, RLOO/GRPO epsilon)."""
    vf_coef: float = Field(ge=0)
    """PPO: weight of the value loss."""
    temperature: float = Field(gt=0)
    """Sampling temperature of the responses trained on."""
    response_length: int = Field(ge=1)
    """Most new tokens per response (training responses and the before/after samples)."""
    max_prompt_length: int = Field(ge=1)
    """Prompts longer than this many tokens (chat template included) are dropped and counted; the
    policy's context minus `response_length` caps it too."""
    stop_token: str | None
    """Token that ends a response; null: `<|im_end|>` when the vocabulary has it (ChatML), else EOS."""
    eval_prompts: int = Field(ge=1)
    """Held-out prompts (never trained on) for the before/after table, the mean rewards and the guard."""
    max_answer_loss_rise: float | None = Field(gt=0)
    """Stop when the policy's mean loss on the held-out prompts' own answers exceeds the SFT
    model's by more than this (nats per token), keeping the last policy within it; null: no stop
    (the loss is still reported before and after)."""
    split_salt: str
    """Salt of the prompt hash that picks the held-out prompts; change it to pick others."""
    reward_batch_size: int = Field(ge=1)
    """Texts per reward-model forward pass when scoring text (samples, RLOO/GRPO, retokenized PPO)."""
    save_steps: int = Field(ge=1)
    """Write a resumable checkpoint every this many updates."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass: less memory, more time."""
    seed: int
    """Seed of sampling, shuffling, the adapters and the value head."""


@dataclass
class Setup:
    """What `setup` prepares once for whichever algorithm trains."""

    cfg: PpoConfig
    paths: Paths
    precision: str
    tokenizer: Any  # set up for RL: left padding, a free pad token, EOS = the stop token
    stop_id: int
    policy: Any
    reward_model: Any
    scorer: rl.RewardScorer
    in_loop: bool
    """PPO feeds the policy's ids straight to the reward model (same vocabulary, TRL `score` head)."""
    records: int
    dropped: dict[str, int]
    max_prompt: int
    train_prompts: list[rl.Prompt]
    heldout: list[rl.Prompt]
    ckpt: Checkpoints
    last: Path | None
    resumed_from: int
    curves: Curves
    guard: rl.AnswerLossGuard
    state: Any  # accelerate's PartialState: device, process count and index


def run(cfg: PpoConfig, paths: Paths, train: TrainConfig) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    job = setup(cfg, paths, train)
    before = answer_heldout(job, job.policy)
    started = time.perf_counter()
    policy, extra = (train_ppo if cfg.algorithm == "ppo" else train_group)(job)
    extra["train_seconds"] = round(time.perf_counter() - started, 2)
    after = answer_heldout(job, policy)
    extra["heldout_answer_loss_after"] = rounded(job.guard.loss(policy))
    metrics = summarise(job, before, after, extra)
    save(job, policy, metrics, rl.sample_rows("before", job.heldout, *before)
         + rl.sample_rows("after", job.heldout, *after))
    return metrics


# --- set-up --------------------------------------------------------------------------------------


def setup(cfg: PpoConfig, paths: Paths, train: TrainConfig) -> Setup:
    """Tokenizers, the reward model, the prompts (dropped ones counted, some held out), the stop
    and pad tokens, the checkpoint folder, and the SFT policy."""
    import torch
    from accelerate import PartialState
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    prompts_file = rl.check_inputs(paths)
    state = PartialState()
    seed_everything(cfg.seed)
    precision = resolve_precision(train.precision)
    tokenizer = AutoTokenizer.from_pretrained(paths.sft)
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(f"the tokenizer of {paths.sft} has no chat template to render prompts with")
    reward_tokenizer = AutoTokenizer.from_pretrained(paths.reward)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        paths.reward, num_labels=1, dtype=rl.frozen_dtype(precision)).to(state.device).eval()
    in_loop = cfg.algorithm == "ppo" and rl.reads_policy_ids(tokenizer, reward_tokenizer, reward_model)

    configs = [AutoConfig.from_pretrained(paths.sft), *([reward_model.config] if in_loop else [])]
    max_prompt = rl.prompt_budget(configs, cfg.max_prompt_length, cfg.response_length)
    records = read_records(paths.dedup, "instructions")
    prompts, dropped = rl.build_prompts(records, tokenizer, max_prompt)
    if not prompts:
        raise StageError(f"{prompts_file} holds no usable prompt ({len(records)} records; dropped: "
                         f"{ {k: v for k, v in dropped.items() if v} }; prompts may have at most {max_prompt} tokens)")
    train_prompts, heldout = rl.split_heldout(prompts, cfg.eval_prompts, cfg.split_salt)
    if len(train_prompts) < cfg.batch_size:
        raise StageError(f"{prompts_file} has {len(prompts)} usable prompts, fewer than ppo.eval_prompts "
                         f"({cfg.eval_prompts}) + ppo.batch_size ({cfg.batch_size})")
    stop_id, pad_id = rl.setup_tokens(tokenizer, cfg.stop_token, prompts)
    log.info("%d prompts (%d train, %d held out), dropped %s; reward %s", len(prompts), len(train_prompts),
             len(heldout), dropped, "on the policy's ids" if in_loop else "through text")

    ckpt = Checkpoints(train, "ppo", cfg, paths.sft, paths.reward, prompts_file, main=state.is_main_process)
    last, resumed_from = ckpt.last()
    if last is not None:
        log.info("resuming from %s (update %d of %d)", last, resumed_from, cfg.updates)
    restore_curves(last, paths.report_dir("ppo"))  # continue the curve the killed run had drawn
    curves = Curves(paths.report_dir("ppo"))
    curves.truncate(resumed_from)
    # Trainable weights stay fp32 (bf16/fp16 is autocast by the trainer); the absolute path is
    # what RLOO/GRPO load their reference model from.
    policy = AutoModelForCausalLM.from_pretrained(Path(paths.sft).resolve(), dtype=torch.float32).to(state.device)
    policy.generation_config.pad_token_id = pad_id
    # the guard renders answers as SFT trained on them: with the sft model's own tokenizer set-up
    guard = rl.AnswerLossGuard([{"prompt": p.messages, "completion": [{"role": "assistant", "content": p.answer}]}
                                for p in heldout if p.answer], AutoTokenizer.from_pretrained(paths.sft),
                               cfg.max_answer_loss_rise, curves)
    guard.start(policy)  # the SFT model, before any checkpoint is loaded
    return Setup(cfg, paths, precision, tokenizer, stop_id, policy, reward_model,
               rl.RewardScorer(reward_model, reward_tokenizer, cfg.reward_batch_size), in_loop, len(records), dropped,
               max_prompt, train_prompts, heldout, ckpt, last, resumed_from, curves, guard, state)


# --- train ---------------------------------------------------------------------------------------


def train_ppo(job: Setup) -> tuple[Any, dict[str, Any]]:
    """TRL's PPOTrainer for the updates not yet done: (trained plain policy, extra metrics)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback
    from trl.experimental.ppo import PPOConfig as TrlPPOConfig
    from trl.experimental.ppo import PPOTrainer

    cfg, tok, last, done, device = job.cfg, job.tokenizer, job.last, job.resumed_from, job.state.device
    policy, ref = job.policy, None
    if cfg.method == "full":
        if last is not None:
            policy = AutoModelForCausalLM.from_pretrained(last / "policy", dtype=torch.float32).to(device)
            policy.generation_config.pad_token_id = tok.pad_token_id
        ref = AutoModelForCausalLM.from_pretrained(job.paths.sft, dtype=rl.frozen_dtype(job.precision))
        ref = ref.to(device).eval()
    torch.manual_seed(cfg.seed)  # the same fresh adapters and value head on every run
    if cfg.method == "lora":  # the reference is the policy with its adapters off
        from peft import PeftModel, get_peft_model

        policy = (PeftModel.from_pretrained(policy, last / "policy", is_trainable=True) if last is not None
                  else get_peft_model(policy, peft_config(cfg.lora, "CAUSAL_LM")))
    value_source = job.paths.reward if job.in_loop else job.paths.sft  # the value model reads the policy's ids
    value = AutoModelForSequenceClassification.from_pretrained(
        last / "value" if last is not None else value_source, num_labels=1, dtype=torch.float32).to(device)
    value.config.pad_token_id = tok.pad_token_id
    reward = job.reward_model if job.in_loop else rl.retokenized_reward(job.scorer, tok, job.train_prompts)

    per_update = cfg.batch_size * job.state.num_processes
    args = TrlPPOConfig(
        output_dir=str(job.ckpt.dir / "trl"), report_to="none", seed=cfg.seed, disable_tqdm=True,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=1, gradient_accumulation_steps=1,
        num_mini_batches=1, total_episodes=cfg.updates * per_update, num_ppo_epochs=cfg.epochs_per_update,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, kl_coef=cfg.kl_coef,
        cliprange=cfg.cliprange, vf_coef=cfg.vf_coef, temperature=cfg.temperature,
        response_length=cfg.response_length, stop_token="eos", num_sample_generations=0,
        local_rollout_forward_batch_size=cfg.batch_size, logging_steps=1, save_strategy="no",
        bf16=job.precision == "bf16", fp16=job.precision == "fp16", gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=job.state.device.type == "cpu",
    )

    def on_update(step: int) -> None:
        if step % cfg.save_steps == 0 and step < cfg.updates:
            if trainer.accelerator.is_main_process:  # full state dicts: plain data parallel, not sharded
                rl.save_ppo_checkpoint(job.ckpt, job.curves, step, trainer)
            trainer.accelerator.wait_for_everyone()

    trainer = PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward, value_model=value,
        train_dataset=datasets.Dataset.from_dict({"input_ids": [p.ids for p in job.train_prompts]}),
        eval_dataset=datasets.Dataset.from_dict({"input_ids": [p.ids for p in job.heldout]}),
        callbacks=[rl.rl_callback(job.curves, cfg.updates, offset=done, on_update=on_update, guard=job.guard,
                                  policy_of=lambda: trainer.accelerator.unwrap_model(trainer.model).policy,
                                  raise_to_stop=True)])
    trainer.remove_callback(PrinterCallback)  # our callback logs one line per update
    # TRL's loop always starts at update 1 over a freshly shuffled loader: give it, as ready
    # batches (a DataLoader would draw from the global RNG and shift it), the remaining updates
    # over the prompts the whole run would have taken from here on; this process's share of each.
    order = rl.rollout_order(len(job.train_prompts), cfg.updates * per_update, cfg.seed)
    first = job.state.process_index * cfg.batch_size
    trainer.dataloader = [
        trainer.data_collator([{"input_ids": job.train_prompts[i].ids}
                               for i in order[u * per_update + first :][: cfg.batch_size]])
        for u in range(done, cfg.updates)
    ]
    trainer.args.num_total_batches = cfg.updates - done
    if last is not None:
        trainer.optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=False))
        trainer.lr_scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=False))
        rl.restore_rng(last)
    if done < cfg.updates:
        try:
            trainer.train()
        except rl.StopTraining:  # the guard stopped it, the policy put back to the last update within it
            pass
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    sizes = count_parameters(trained)  # before the adapters are merged away
    return rl.plain(trained), {"rollouts": cfg.updates * per_update, **sizes}


def train_group(job: Setup) -> tuple[Any, dict[str, Any]]:
    """RLOO or GRPO, TRL's Trainer-based loops, which checkpoint and resume themselves:
    (trained plain policy, extra metrics)."""
    import datasets
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg, scorer = job.cfg, job.scorer

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return scorer(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])

    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if cfg.algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    args = config_cls(
        output_dir=str(job.ckpt.dir), report_to="none", seed=cfg.seed, disable_tqdm=True, max_steps=cfg.updates,
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=cfg.num_generations, num_iterations=cfg.epochs_per_update,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, beta=cfg.kl_coef,
        epsilon=cfg.cliprange, temperature=cfg.temperature, max_completion_length=cfg.response_length,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        bf16=job.precision == "bf16", fp16=job.precision == "fp16", gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=job.state.device.type == "cpu",
        model_init_kwargs={"dtype": str(rl.frozen_dtype(job.precision)).removeprefix("torch.")},  # the reference
    )
    trainer = trainer_cls(
        model=job.policy, reward_funcs=reward_model, args=args, processing_class=job.tokenizer,
        train_dataset=datasets.Dataset.from_list([{"prompt": p.messages} for p in job.train_prompts]),
        peft_config=peft_config(cfg.lora, "CAUSAL_LM") if cfg.method == "lora" else None,
        callbacks=[rl.rl_callback(job.curves, cfg.updates, guard=job.guard, policy_of=lambda: trainer.model)])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(job.last) if job.last is not None else None)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    sizes = count_parameters(trained)  # before the adapters are merged away
    rollouts = cfg.updates * cfg.batch_size * cfg.num_generations * job.state.num_processes
    return rl.plain(trained), {"rollouts": rollouts, **sizes}


# --- evaluate and save -----------------------------------------------------------------------------


def answer_heldout(job: Setup, policy: Any) -> tuple[list[str], list[float]]:
    """The policy's greedy answers to the held-out prompts and the reward model's scores."""
    answers = greedy(policy, job.tokenizer, [p.ids for p in job.heldout], job.cfg.response_length,
                     stop_id=job.stop_id, pad_id=job.tokenizer.pad_token_id)
    return answers, job.scorer([p.messages for p in job.heldout], answers)


def summarise(job: Setup, before: tuple[list[str], list[float]], after: tuple[list[str], list[float]],
              extra: dict[str, Any]) -> dict[str, Any]:
    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4)

    final = job.curves.rows[-1] if job.curves.rows else {}
    return {
        "algorithm": job.cfg.algorithm,
        "method": job.cfg.method,
        "updates": job.cfg.updates,
        "resumed_from_step": job.resumed_from,
        **split_counts(job.records, job.train_prompts, job.heldout, {k: v for k, v in job.dropped.items() if v}),
        "max_prompt_tokens": job.max_prompt,
        "reward_before": mean(before[1]),
        "reward_after": mean(after[1]),
        "reward_gain": round(mean(after[1]) - mean(before[1]), 4),
        "reward_input": "policy_ids" if job.in_loop else "text",
        "heldout_answer_loss_before": rounded(job.guard.before),
        "stopped_early": job.guard.stopped,
        "threads": threads(),
        "last_update": {k: round(v, 4) for k, v in final.items()
                        if k in ("kl", "reward", "policy_loss", "value_loss", "entropy")},
        **extra,
    }


def save(job: Setup, policy: Any, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The samples table and the plain policy folder (main process), then the checkpoints go."""
    from transformers import AutoTokenizer

    if job.state.is_main_process:
        write_jsonl(job.paths.report_dir("ppo") / "samples.jsonl", rows)
        rl.log_samples_table(rows)
        tokenizer = AutoTokenizer.from_pretrained(job.paths.sft)  # as SFT left it, not our RL set-up
        save_model(job.paths.ppo, "ppo", job.cfg, metrics, policy, tokenizer)
    job.state.wait_for_everyone()
    job.ckpt.finish()


def main(argv: list[str] | None = None) -> int:
    return run_stage("ppo", PpoConfig, run, argv, training=TrainConfig)


if __name__ == "__main__":
    sys.exit(main())
