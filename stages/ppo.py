"""ppo: tune the SFT policy against the reward model with PPO, RLOO or GRPO (TRL).

Reads the policy (and the reference it is kept close to) from `models/sft/`, the reward model
(a sequence classifier with one output, with its own tokenizer) from `models/reward/`, and the
prompts from `data/dedup/instructions.parquet`: each conversation up to its last user turn,
rendered with the policy's chat template and a generation prompt. Duplicate prompts, records
without a user turn and prompts too long for the policy's context are skipped and counted
(never truncated: a cut instruction is a different instruction). A salted hash of the rendered
prompt holds out `eval_prompts` prompts that are never trained on; the policy's greedy answers
to them, before and after training, with the reward model's score of each, are written to
`reports/ppo/samples.jsonl`.

`algorithm: ppo` is `trl.experimental.ppo.PPOTrainer` (a value model initialised from the reward
model); `rloo` and `grpo` are TRL's critic-free `RLOOTrainer` and `GRPOTrainer`, given the reward
model as a reward function. The reward model reads prompt and response as text through its own
tokenizer (`reward_text`); PPO calls it inside its loop on the policy's token ids, so when the two
vocabularies differ the ids are decoded and re-encoded (`RetokenizedReward`) and the value model
starts from the SFT model instead. Curves (KL, reward, policy and value loss, entropy) go to
`reports/ppo/curves.csv` and MLflow. A killed run resumes from its last complete checkpoint
(policy, value model, optimizer, scheduler, step, RNG; for RLOO/GRPO the Trainer's own).
Writes the policy as a plain Hugging Face folder to `models/ppo/`.

    python -m stages.ppo [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import read_records, write_jsonl
from stages.common.runner import run_stage
from stages.common.training import (
    Checkpoints,
    Curves,
    TrainConfig,
    dir_signature,
    fingerprint,
    resolve_precision,
    save_model,
    seed_everything,
)

log = logging.getLogger("llm_forge.ppo")

# TRL's log keys -> the curve names every algorithm shares (other keys keep their TRL names).
CURVE_NAMES = {
    "objective/kl": "kl", "objective/scores": "reward", "loss/value_avg": "value_loss",
    "loss/policy_avg": "policy_loss", "policy/entropy_avg": "entropy",  # PPO
    "kl": "kl", "reward": "reward", "loss": "policy_loss", "entropy": "entropy",  # RLOO / GRPO
}
CHATML_END = "<|im_end|>"


class PpoConfig(StageConfig):
    """The `ppo` section: reinforcement learning from the reward model's scores."""

    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"
    """ppo: TRL's PPOTrainer with a value model; rloo / grpo: TRL's critic-free RLOO / GRPO."""
    updates: int = Field(5, ge=1)
    """Policy updates; each samples responses to `batch_size` prompts and optimises on them."""
    batch_size: int = Field(4, ge=2)
    """Prompts per update (per process)."""
    num_generations: int = Field(2, ge=2)
    """RLOO / GRPO: responses sampled per prompt, the group its baseline is taken over (PPO: one)."""
    epochs_per_update: int = Field(1, ge=1)
    """Optimisation passes over each batch of responses (PPO num_ppo_epochs, RLOO/GRPO num_iterations)."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate of the policy (and of the value model for PPO)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the updates."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL penalty towards the SFT policy (PPO kl_coef, RLOO/GRPO beta)."""
    cliprange: float = Field(0.2, gt=0)
    """Clip range of the policy ratio (PPO cliprange, RLOO/GRPO epsilon)."""
    vf_coef: float = Field(0.1, ge=0)
    """PPO: weight of the value loss."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature of the responses trained on."""
    response_length: int = Field(20, ge=1)
    """Most new tokens per response (training responses and the before/after samples)."""
    max_prompt_length: int = Field(96, ge=1)
    """Prompts longer than this many tokens (chat template included) are skipped and counted; the
    policy's context minus `response_length` caps it too."""
    stop_token: str | None = None
    """Token that ends a response; null: `<|im_end|>` when the vocabulary has it (ChatML), else EOS."""
    eval_prompts: int = Field(6, ge=1)
    """Held-out prompts (never trained on) for the before/after table and mean rewards."""
    split_salt: str = "llm-forge-ppo"
    """Salt of the prompt hash that picks the held-out prompts; change it to pick others."""
    reward_batch_size: int = Field(8, ge=1)
    """Texts per reward-model forward pass when scoring text (samples, RLOO/GRPO, retokenized PPO)."""
    save_steps: int = Field(3, ge=1)
    """Write a resumable checkpoint every this many updates."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    seed: int = 0
    """Seed of sampling, shuffling and the value head."""


# --- prompts ---------------------------------------------------------------------------------


@dataclass
class Prompt:
    id: str
    messages: list[dict[str, str]]
    """The conversation up to and including its last user turn."""
    text: str
    """`messages` rendered with the policy's chat template and a generation prompt."""
    ids: list[int]


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]] | None:
    """The conversation up to its last user turn (what the policy answers); None without one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]


def build_prompts(records: list[dict[str, Any]], tokenizer: Any, max_tokens: int) -> tuple[list[Prompt], dict[str, int]]:
    """Usable prompts in record order, and reason -> count of the records skipped."""
    prompts: list[Prompt] = []
    dropped = {"no_user_turn": 0, "duplicate": 0, "too_long": 0}
    seen: set[str] = set()
    for rec in records:
        messages = prompt_messages(rec["messages"] or [])
        if messages is None:
            dropped["no_user_turn"] += 1
            continue
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            dropped["too_long"] += 1
            continue
        prompts.append(Prompt(rec["id"], messages, text, ids))
    return prompts, dropped


def split_heldout(prompts: list[Prompt], n: int, salt: str) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): the `n` prompts with the smallest salted hash are held out, so the
    choice is stable when other prompts come or go."""
    def key(p: Prompt) -> bytes:
        return hashlib.blake2b(f"{salt}\x00{p.text}".encode(), digest_size=8).digest()

    held = {id(p) for p in sorted(prompts, key=key)[:n]}
    return [p for p in prompts if id(p) not in held], sorted((p for p in prompts if id(p) in held), key=key)


# --- tokens ------------------------------------------------------------------------------------


def stop_token_id(tokenizer: Any, stop_token: str | None) -> int:
    if stop_token is None:
        stop_token = CHATML_END if CHATML_END in tokenizer.get_vocab() else tokenizer.eos_token
    if stop_token is None or stop_token not in tokenizer.get_vocab():
        raise StageError(f"ppo.stop_token: {stop_token!r} is not in the policy's vocabulary")
    return tokenizer.convert_tokens_to_ids(stop_token)


def free_pad_id(tokenizer: Any, reserved: set[int], used: set[int]) -> int | None:
    """A special token to pad with that is neither EOS/stop nor in any prompt. TRL's PPO tells
    padding from text by the pad id alone, so a pad that doubles as `<|im_end|>` (SmolLM2's)
    would mask the end of every user turn."""
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, *sorted(tokenizer.all_special_ids),
                  *sorted(tokenizer.added_tokens_decoder)]
    for tid in candidates:
        if tid is not None and tid not in reserved and tid not in used:
            return tid
    return None


# --- the reward model --------------------------------------------------------------------------


def reward_text(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[str, bool]:
    """What the reward model reads for a prompt and a response, and whether its tokenizer adds
    special tokens: the reward tokenizer's chat template over the conversation and the answer
    when it has one, else prompt + response + EOS; the two formats of TRL's RewardTrainer."""
    if getattr(tokenizer, "chat_template", None):
        convo = [*messages, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(convo, tokenize=False), False
    prompt = "\n\n".join(m["content"] for m in messages)
    return prompt + response + (tokenizer.eos_token or ""), True


class RewardScorer:
    """Scores (conversation, response) pairs as text with the reward model and its tokenizer;
    too-long texts lose their beginning (the response is what is judged)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        tokenizer.truncation_side = "left"
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        model.config.pad_token_id = tokenizer.pad_token_id
        limits = (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
        self.max_length = min((x for x in limits if x and x < 10**9), default=None)  # tokenizers say 1e30: none

    def __call__(self, conversations: list[list[dict[str, str]]], responses: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(responses), self.batch_size):
            pairs = [reward_text(self.tokenizer, c, r) for c, r in
                     zip(conversations[start : start + self.batch_size], responses[start : start + self.batch_size])]
            enc = self.tokenizer([t for t, _ in pairs], add_special_tokens=pairs[0][1], padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            with torch.no_grad():
                scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def make_retokenized_reward(scorer: RewardScorer, policy_tokenizer: Any, prompts: list[Prompt]) -> Any:
    """The reward model as TRL's PPO calls it (`model.<base_model_prefix>(input_ids=...)` then
    `model.score(hidden_states[-1])`, on the policy's ids) when it reads another vocabulary: each
    sequence is split into its known prompt and the response, scored as text, and the score is
    returned at every position."""
    import torch
    from torch import nn

    by_ids = {tuple(p.ids): p.messages for p in prompts}
    lengths = sorted({len(p.ids) for p in prompts}, reverse=True)

    class RetokenizedReward(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self) -> None:
            super().__init__()
            self.reward = scorer.model
            self.score = nn.Identity()

        def backbone(self, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
            convs, responses = [], []
            for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                ids = [t for t, m in zip(row, mask) if m]
                n = next((n for n in lengths if tuple(ids[:n]) in by_ids), None)
                if n is None:
                    raise RuntimeError("ppo: a rollout does not start with a known prompt")
                convs.append(by_ids[tuple(ids[:n])])
                responses.append(policy_tokenizer.decode(ids[n:], skip_special_tokens=True))
            scores = torch.tensor(scorer(convs, responses), device=input_ids.device)
            hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
            return type("Out", (), {"hidden_states": (hidden,)})()

    return RetokenizedReward()


def same_vocab(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()


# --- samples -----------------------------------------------------------------------------------


def generate_greedy(model: Any, prompts: list[Prompt], max_new_tokens: int, stop_id: int, pad_id: int,
                    tokenizer: Any, batch_size: int = 8) -> list[str]:
    """Greedy responses to `prompts` (left-padded batches), cut at the stop token."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id, pad_token_id=pad_id)
    out: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = [p.ids for p in prompts[start : start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for row in seqs[:, width:].tolist():
            if stop_id in row:
                row = row[: row.index(stop_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return out


def sample_rows(when: str, prompts: list[Prompt], responses: list[str], rewards: list[float]) -> list[dict[str, Any]]:
    return [{"id": p.id, "when": when, "prompt": p.messages[-1]["content"], "response": r, "reward": round(s, 4)}
            for p, r, s in zip(prompts, responses, rewards)]


# --- curves, progress and checkpoints -----------------------------------------------------------


def curve_row(logs: dict[str, Any]) -> dict[str, float]:
    """TRL's log row with the shared curve names (kl, reward, policy_loss, value_loss, entropy)."""
    return {CURVE_NAMES.get(k, k): v for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def make_callback(curves: Curves, total: int, offset: int = 0, on_update: Any = None) -> Any:
    """Curves (at `offset` + the trainer's step: PPO restarts its count on resume), one progress
    line per update with rate and ETA, `on_update(step)` after each update, and for the HF
    Trainer's own checkpoints a copy of the curve so a resumed run continues it."""
    from transformers import TrainerCallback

    class PpoCallback(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.done = 0

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if not logs or not state.is_world_process_zero:
                return
            row = curve_row(logs)
            step = offset + state.global_step
            curves.log(step, row)
            if "reward" in row and "train_runtime" not in row:
                self.done += 1
                rate = (time.perf_counter() - self.started) / self.done
                log.info("update %d/%d: reward %.4f, kl %.4f, %.1f s/update, ETA %.0f s", step, total,
                         row["reward"], row.get("kl", float("nan")), rate, rate * (total - step))

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if on_update is not None:
                on_update(offset + state.global_step)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir() and curves.path.exists():
                shutil.copy2(curves.path, folder / "curves.csv")

    return PpoCallback()


def restore_curve(checkpoint: Path, curves_path: Path) -> None:
    """Put the curve saved with `checkpoint` back in the report folder (the runner cleared it)."""
    saved = checkpoint / "curves.csv"
    if saved.exists():
        curves_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(saved, curves_path)


def save_ppo_checkpoint(ckpt: Checkpoints, step: int, trainer: Any, curves: Curves) -> None:
    """Policy, value model, optimizer, scheduler, step and RNG after update `step`; then only the
    newest complete checkpoint is kept."""
    import random

    import numpy as np
    import torch

    path = ckpt.path(step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.policy.save_pretrained(path / "policy")
    unwrapped.value_model.save_pretrained(path / "value")
    torch.save(trainer.optimizer.state_dict(), path / "optimizer.pt")
    torch.save(trainer.lr_scheduler.state_dict(), path / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, path / "rng.pt")
    (path / "state.json").write_text(json.dumps({"step": step}) + "\n")
    if curves.path.exists():
        shutil.copy2(curves.path, path / "curves.csv")
    ckpt.mark_complete(path)
    for old in ckpt.dir.glob("checkpoint-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint after update %d: %s", step, path)


def restore_rng(path: Path) -> None:
    import random

    import numpy as np
    import torch

    state = torch.load(path / "rng.pt", weights_only=False)  # our own file
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rollout_order(n_prompts: int, total: int, seed: int) -> list[int]:
    """Prompt indices for `total` rollouts: a fresh seeded permutation per pass over the prompts,
    so a resumed run takes the same prompts the killed run would have."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < total:
        order.extend(rng.permutation(n_prompts).tolist())
    return order[:total]


# --- the stage ---------------------------------------------------------------------------------


@dataclass
class Job:
    """What `run` prepares once for whichever algorithm trains."""

    cfg: PpoConfig
    paths: Paths
    precision: str
    tokenizer: Any
    """The policy's tokenizer, set up for RL: left padding, a free pad token, EOS = the stop token."""
    policy: Any
    reward_model: Any
    scorer: RewardScorer
    train_prompts: list[Prompt]
    heldout: list[Prompt]
    in_loop: bool
    """PPO feeds the policy's ids straight to the reward model (same vocabulary, TRL `score` head)."""
    ckpt: Checkpoints
    last: Path | None
    resumed_from: int
    curves: Curves
    device: Any
    frozen_dtype: Any
    """Dtype of the models that are not trained (reference, reward)."""
    world_size: int
    rank: int


def check_model_dir(path: Path, what: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise StageError(f"ppo: the {what} {path} does not exist or holds no model (config.json): "
                         f"run the {what.split()[0]} stage first")


def run(cfg: PpoConfig, paths: Paths, train: TrainConfig = TrainConfig()) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from accelerate import PartialState
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    check_model_dir(paths.sft, "sft model")
    check_model_dir(paths.reward, "reward model")
    if not (Path(paths.reward) / "tokenizer_config.json").is_file():
        raise StageError(f"ppo: the reward model {paths.reward} has no tokenizer (tokenizer_config.json)")
    prompts_file = Path(paths.dedup) / "instructions.parquet"
    if not prompts_file.is_file():
        raise StageError(f"ppo: the prompt file {prompts_file} does not exist")

    state = PartialState()
    seed_everything(cfg.seed)
    precision = resolve_precision(train.precision)
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(paths.sft)
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(f"ppo: the tokenizer of {paths.sft} has no chat template to render prompts with")
    reward_tokenizer = AutoTokenizer.from_pretrained(paths.reward)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        paths.reward, num_labels=1, dtype=frozen_dtype).to(state.device).eval()
    # PPO runs the reward model inside its loop on the policy's ids: directly when it shares the
    # policy's vocabulary and has the `score` head TRL calls, else through text (RetokenizedReward).
    in_loop = same_vocab(tokenizer, reward_tokenizer) and isinstance(getattr(reward_model, "score", None),
                                                                     torch.nn.Linear)
    policy_config = AutoConfig.from_pretrained(paths.sft)
    context = getattr(policy_config, "max_position_embeddings", None) or 10**9
    if cfg.algorithm == "ppo" and in_loop:
        context = min(context, getattr(reward_model.config, "max_position_embeddings", None) or 10**9)
    max_prompt = min(cfg.max_prompt_length, context - cfg.response_length)
    if max_prompt < 1:
        raise StageError(f"ppo.response_length: {cfg.response_length} new tokens leave no room for a prompt "
                         f"in the context of {context} tokens")

    records = read_records(paths.dedup, "instructions")
    prompts, dropped = build_prompts(records, tokenizer, max_prompt)
    if not prompts:
        raise StageError(f"ppo: {prompts_file} holds no usable prompt ({len(records)} records; skipped: "
                         f"{ {k: v for k, v in dropped.items() if v} }; prompts may have at most {max_prompt} tokens)")
    train_prompts, heldout = split_heldout(prompts, cfg.eval_prompts, cfg.split_salt)
    if len(train_prompts) < cfg.batch_size:
        raise StageError(f"ppo: {prompts_file} has {len(prompts)} usable prompts, fewer than ppo.eval_prompts "
                         f"({cfg.eval_prompts}) + ppo.batch_size ({cfg.batch_size})")

    stop_id = stop_token_id(tokenizer, cfg.stop_token)
    reserved = {stop_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    pad_id = free_pad_id(tokenizer, reserved, {t for p in prompts for t in p.ids})
    if pad_id is None:
        raise StageError(f"ppo: the tokenizer of {paths.sft} has no special token free to pad with (not the "
                         f"stop token and in no prompt): add a pad token to it")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_id)  # TRL stops responses at EOS
    tokenizer.padding_side = "left"
    log.info("%d prompts (%d train, %d held out), skipped %s; reward %s", len(prompts), len(train_prompts),
             len(heldout), dropped, "in the loop" if in_loop else "through text (other vocabulary)")

    ckpt = Checkpoints(train, "ppo", fingerprint(
        "ppo", cfg.model_dump(mode="json"), train.num_processes, precision, dir_signature(paths.sft),
        dir_signature(paths.reward), dir_signature(prompts_file)))
    last, resumed_from = ckpt.last()
    if last is not None:
        log.info("resuming from %s (update %d of %d)", last, resumed_from, cfg.updates)

    scorer = RewardScorer(reward_model, reward_tokenizer, cfg.reward_batch_size)
    # Trainable weights stay fp32 (bf16/fp16 is autocast by the trainer); the absolute path is
    # what RLOO/GRPO load their reference model from.
    policy = AutoModelForCausalLM.from_pretrained(Path(paths.sft).resolve(), dtype=torch.float32).to(state.device)
    policy.generation_config.pad_token_id = pad_id

    # Before: the SFT policy's greedy answers to the held-out prompts.
    before = generate_greedy(policy, heldout, cfg.response_length, stop_id, pad_id, tokenizer)
    before_rewards = scorer([p.messages for p in heldout], before)

    if last is not None:  # continue the curve the killed run had drawn up to its checkpoint
        restore_curve(last, paths.report_dir("ppo") / "curves.csv")
    curves = Curves(paths.report_dir("ppo"))
    curves.truncate(resumed_from)
    job = Job(cfg, paths, precision, tokenizer, policy, reward_model, scorer, train_prompts, heldout, in_loop,
              ckpt, last, resumed_from, curves, state.device, frozen_dtype, state.num_processes,
              state.process_index)
    started = time.perf_counter()
    policy, extra = (train_ppo if cfg.algorithm == "ppo" else train_group)(job)
    train_seconds = time.perf_counter() - started

    after = generate_greedy(policy, heldout, cfg.response_length, stop_id, pad_id, tokenizer)
    after_rewards = scorer([p.messages for p in heldout], after)
    rows = sample_rows("before", heldout, before, before_rewards) + sample_rows("after", heldout, after, after_rewards)

    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    final = {k: round(v, 4) for k, v in (curves.rows[-1] if curves.rows else {}).items()
             if k in ("kl", "reward", "policy_loss", "value_loss", "entropy")}
    metrics: dict[str, Any] = {
        "algorithm": cfg.algorithm,
        "updates": cfg.updates,
        "resumed_from_step": resumed_from,
        "prompts_in": len(records),
        "prompts_train": len(train_prompts),
        "prompts_heldout": len(heldout),
        "prompts_dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "max_prompt_tokens": max_prompt,
        "reward_before": mean(before_rewards),
        "reward_after": mean(after_rewards),
        "reward_gain": round(mean(after_rewards) - mean(before_rewards), 4),
        "reward_input": "policy_ids" if cfg.algorithm == "ppo" and in_loop else "text",
        "last_update": final,
        "train_seconds": round(train_seconds, 2),
        **extra,
    }
    if state.is_main_process:
        write_jsonl(paths.report_dir("ppo") / "samples.jsonl", rows)
        log_samples_table(rows)
        save_tokenizer = AutoTokenizer.from_pretrained(paths.sft)  # as SFT left it, not our padding set-up
        save_model(paths.ppo, "ppo", cfg, metrics, policy, save_tokenizer)
    state.wait_for_everyone()
    ckpt.finish()
    return metrics


def log_samples_table(rows: list[dict[str, Any]]) -> None:
    """The before/after table as an MLflow table (the jsonl is also an artifact of the report)."""
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file="ppo/samples_table.json")
    except Exception as err:  # a table view is not worth failing a finished run over
        log.debug("mlflow table logging failed: %s", err)


def train_ppo(job: Job) -> tuple[Any, dict[str, Any]]:
    """TRL's PPOTrainer for the updates not yet done: (trained policy, extra metrics)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback
    from trl.experimental.ppo import PPOConfig as TrlPPOConfig
    from trl.experimental.ppo import PPOTrainer

    cfg, tok, last, done = job.cfg, job.tokenizer, job.last, job.resumed_from
    ref = AutoModelForCausalLM.from_pretrained(job.paths.sft, dtype=job.frozen_dtype).to(job.device).eval()
    policy = job.policy
    value_source = job.paths.reward if job.in_loop else job.paths.sft  # the value model reads the policy's ids
    if last is not None:
        policy = AutoModelForCausalLM.from_pretrained(last / "policy", dtype=torch.float32).to(job.device)
        policy.generation_config.pad_token_id = tok.pad_token_id
        value_source = last / "value"
    torch.manual_seed(cfg.seed)  # a fresh value head (value from SFT) is the same on every run
    value = AutoModelForSequenceClassification.from_pretrained(value_source, num_labels=1,
                                                               dtype=torch.float32).to(job.device)
    value.config.pad_token_id = tok.pad_token_id
    reward = job.reward_model if job.in_loop else make_retokenized_reward(job.scorer, tok, job.train_prompts)

    world = job.world_size
    per_update = cfg.batch_size * world
    args = TrlPPOConfig(
        output_dir=str(job.ckpt.dir / "trl"), report_to="none", seed=cfg.seed, disable_tqdm=True,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=1, gradient_accumulation_steps=1,
        num_mini_batches=1, total_episodes=cfg.updates * per_update, num_ppo_epochs=cfg.epochs_per_update,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, kl_coef=cfg.kl_coef,
        cliprange=cfg.cliprange, vf_coef=cfg.vf_coef, temperature=cfg.temperature,
        response_length=cfg.response_length, stop_token="eos", num_sample_generations=0,
        local_rollout_forward_batch_size=cfg.batch_size, logging_steps=1, save_strategy="no",
        bf16=job.precision == "bf16", fp16=job.precision == "fp16", gradient_checkpointing=cfg.gradient_checkpointing,
    )
    train_ds = datasets.Dataset.from_dict({"input_ids": [p.ids for p in job.train_prompts]})
    eval_ds = datasets.Dataset.from_dict({"input_ids": [p.ids for p in job.heldout]})

    def on_update(step: int) -> None:
        if step % cfg.save_steps == 0 and step < cfg.updates:
            if trainer.accelerator.is_main_process:  # full state dicts: plain data parallel, not sharded
                save_ppo_checkpoint(job.ckpt, step, trainer, job.curves)
            trainer.accelerator.wait_for_everyone()

    callback = make_callback(job.curves, cfg.updates, offset=done, on_update=on_update)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train_ds, value_model=value, eval_dataset=eval_ds, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # our callback logs one line per update
    # TRL's loop always starts at update 1 over a freshly shuffled loader: give it, as ready
    # batches (a DataLoader would draw from the global RNG and shift it), the remaining updates
    # over the prompts the whole run would have taken from here on; this process's share of each.
    order = rollout_order(len(train_ds), cfg.updates * per_update, cfg.seed)
    rank = job.rank
    trainer.dataloader = [
        trainer.data_collator([{"input_ids": job.train_prompts[i].ids}
                               for i in order[u * per_update + rank * cfg.batch_size :][: cfg.batch_size]])
        for u in range(done, cfg.updates)
    ]
    trainer.args.num_total_batches = cfg.updates - done
    if last is not None:
        trainer.optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=False))
        trainer.lr_scheduler.load_state_dict(torch.load(last / "scheduler.pt", weights_only=False))
        restore_rng(last)
    if done < cfg.updates:
        trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model).policy, {"rollouts": cfg.updates * per_update}


def train_group(job: Job) -> tuple[Any, dict[str, Any]]:
    """RLOO or GRPO, TRL's Trainer-based loops, which checkpoint and resume themselves:
    (trained policy, extra metrics)."""
    import datasets
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg, scorer = job.cfg, job.scorer

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return scorer(prompts, responses)

    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if cfg.algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    args = config_cls(
        output_dir=str(job.ckpt.dir), report_to="none", seed=cfg.seed, disable_tqdm=True, max_steps=cfg.updates,
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=cfg.num_generations, num_iterations=cfg.epochs_per_update,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, beta=cfg.kl_coef,
        epsilon=cfg.cliprange, temperature=cfg.temperature, max_completion_length=cfg.response_length,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        bf16=job.precision == "bf16", fp16=job.precision == "fp16", gradient_checkpointing=cfg.gradient_checkpointing,
        model_init_kwargs={"dtype": str(job.frozen_dtype).removeprefix("torch.")},  # the reference model
    )
    train_ds = datasets.Dataset.from_list([{"prompt": p.messages} for p in job.train_prompts])
    trainer = trainer_cls(model=job.policy, reward_funcs=reward_model, args=args, train_dataset=train_ds,
                          processing_class=job.tokenizer, callbacks=[make_callback(job.curves, cfg.updates)])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(job.last) if job.last is not None else None)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return policy, {"rollouts": cfg.updates * cfg.batch_size * cfg.num_generations * job.world_size}


def main(argv: list[str] | None = None) -> int:
    return run_stage("ppo", PpoConfig, run, argv, training=True)


if __name__ == "__main__":
    sys.exit(main())
