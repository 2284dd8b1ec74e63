"""What reinforcement learning from a reward model needs around TRL's trainers (stages/ppo.py):
prompts from chat records, a stop and a pad token, the reward model as a text scorer (and as the
id-level model TRL's PPO calls when the vocabularies differ), a guard that stops a policy drifting
from what SFT taught it, curves and progress, the rollout order and RNG state of a resumable PPO loop.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.config import Paths, StageError
from stages.common.shards import shard_paths
from stages.common.training import Checkpoints, Curves

log = logging.getLogger("llm_forge.rl")

# TRL's log keys -> the curve names every algorithm shares (other keys keep their TRL names).
CURVE_NAMES = {
    "objective/kl": "kl", "objective/scores": "reward", "loss/value_avg": "value_loss",
    "loss/policy_avg": "policy_loss", "policy/entropy_avg": "entropy",  # PPO
    "kl": "kl", "reward": "reward", "loss": "policy_loss", "entropy": "entropy",  # RLOO / GRPO
}
CHATML_END = "<|im_end|>"


# --- prompts ---------------------------------------------------------------------------------


@dataclass
class Prompt:
    id: str
    messages: list[dict[str, str]]
    """The conversation up to and including its last user turn."""
    text: str
    """`messages` rendered with the policy's chat template and a generation prompt."""
    ids: list[int]
    answer: str | None
    """The record's own answer to the prompt (the assistant turn after it), if it has one."""


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]] | None:
    """The conversation up to its last user turn (what the policy answers); None without one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]


def record_answer(messages: list[dict[str, Any]], prompt: list[dict[str, str]]) -> str | None:
    """The assistant turn that follows `prompt` in the record, when there is a non-empty one."""
    after = messages[len(prompt)] if len(messages) > len(prompt) else None
    if after is None or after["role"] != "assistant" or not (after["content"] or "").strip():
        return None
    return after["content"]


def build_prompts(records: list[dict[str, Any]], tokenizer: Any,
                  max_tokens: int) -> tuple[list[Prompt], dict[str, int]]:
    """Usable prompts in record order, and reason -> count of the records skipped (never cut:
    a cut instruction is a different instruction)."""
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
        prompts.append(Prompt(rec["id"], messages, text, ids, record_answer(rec["messages"], messages)))
    return prompts, dropped


def check_inputs(paths: Paths) -> Path:
    """The prompt file, once the sft and reward models are known to be there."""
    for folder, what in ((paths.sft, "sft model"), (paths.reward, "reward model")):
        if not (Path(folder) / "config.json").is_file():
            raise StageError(f"the {what} {folder} does not exist or holds no model (config.json): "
                             f"run the {what.split()[0]} stage first")
    if not (Path(paths.reward) / "tokenizer_config.json").is_file():
        raise StageError(f"the reward model {paths.reward} has no tokenizer (tokenizer_config.json)")
    prompts_file = Path(paths.dedup) / "instructions"
    if not shard_paths(paths.dedup, "instructions"):
        raise StageError(f"the prompt shards {prompts_file} do not exist")
    return prompts_file


def prompt_budget(configs: list[Any], max_prompt_length: int, response_length: int) -> int:
    """The most prompt tokens: `max_prompt_length`, or less where the context of a model that
    reads prompt + response (`configs`) leaves less room."""
    context = min((getattr(c, "max_position_embeddings", None) or 10**9 for c in configs), default=10**9)
    budget = min(max_prompt_length, context - response_length)
    if budget < 1:
        raise StageError(f"ppo.response_length: {response_length} new tokens leave no room for a prompt "
                         f"in the context of {context} tokens")
    return budget


def split_heldout(prompts: list[Prompt], n: int, salt: str) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): the `n` prompts with the smallest salted hash are held out, so the
    choice is stable when other prompts come or go."""
    def key(p: Prompt) -> bytes:
        return hashlib.blake2b(f"{salt}\x00{p.text}".encode(), digest_size=8).digest()

    held = {id(p) for p in sorted(prompts, key=key)[:n]}
    return [p for p in prompts if id(p) not in held], sorted((p for p in prompts if id(p) in held), key=key)


# --- tokens ------------------------------------------------------------------------------------


def stop_token_id(tokenizer: Any, stop_token: str | None) -> int:
    """The token that ends a response: `stop_token`, else `<|im_end|>` where the vocabulary has
    it (ChatML), else EOS."""
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


def setup_tokens(tokenizer: Any, stop_token: str | None, prompts: list[Prompt]) -> tuple[int, int]:
    """(stop id, pad id), set on `tokenizer` the way TRL reads them: EOS is the stop token (TRL
    stops responses at EOS), the pad token is free, padding is on the left."""
    stop_id = stop_token_id(tokenizer, stop_token)
    reserved = {stop_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    pad_id = free_pad_id(tokenizer, reserved, {t for p in prompts for t in p.ids})
    if pad_id is None:
        raise StageError(f"the tokenizer of {tokenizer.name_or_path} has no special token free to pad with "
                         f"(not the stop token and in no prompt): add a pad token to it")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    tokenizer.padding_side = "left"
    return stop_id, pad_id


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


def reads_policy_ids(policy_tokenizer: Any, reward_tokenizer: Any, reward_model: Any) -> bool:
    """Whether TRL's PPO can run the reward model on the policy's ids as they are: the same
    vocabulary, and the `score` head TRL calls."""
    import torch

    return (policy_tokenizer.get_vocab() == reward_tokenizer.get_vocab()
            and isinstance(getattr(reward_model, "score", None), torch.nn.Linear))


def retokenized_reward(scorer: RewardScorer, policy_tokenizer: Any, prompts: list[Prompt]) -> Any:
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
                    raise RuntimeError("a rollout does not start with a known prompt")
                convs.append(by_ids[tuple(ids[:n])])
                responses.append(policy_tokenizer.decode(ids[n:], skip_special_tokens=True))
            scores = torch.tensor(scorer(convs, responses), device=input_ids.device)
            hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
            return type("Out", (), {"hidden_states": (hidden,)})()

    return RetokenizedReward()


# --- the drift guard ---------------------------------------------------------------------------


class StopTraining(Exception):
    """Raised from a callback to end a training loop that does not read `control.should_training_stop`
    (TRL's experimental PPOTrainer)."""


class AnswerLossGuard:
    """Stops RL when the policy forgets what SFT taught it: after every update the policy's mean
    loss on the answers of held-out prompts (the records' own answers, never trained on here, never
    scored by a reward model or judge) is measured; when it exceeds the sft model's by more than
    `max_rise`, the trainable weights go back to those of the last update within it and training
    stops. With `max_rise` None it only measures (the stage's metrics report the loss before and
    after either way)."""

    def __init__(self, examples: list[dict[str, Any]], tokenizer: Any, max_rise: float | None,
                 curves: Curves) -> None:
        self.examples, self.tokenizer, self.max_rise, self.curves = examples, tokenizer, max_rise, curves
        self.before: float | None = None
        self.kept: dict[str, Any] = {}
        self.stopped: dict[str, Any] | None = None

    def loss(self, model: Any) -> float | None:
        from stages.common.lm import answer_losses

        if not self.examples:
            return None
        was_training = model.training
        model.eval()
        losses = answer_losses(model, self.tokenizer, self.examples)
        model.train(was_training)
        return sum(losses) / len(losses)

    def start(self, sft_policy: Any) -> None:
        """The sft model's loss: the line the policy is held to."""
        self.before = self.loss(sft_policy)

    def keep(self, policy: Any) -> None:
        self.kept = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    def within(self, policy: Any, step: int) -> bool:
        """Whether the policy after update `step` is within the limit; if not, it is put back to the
        last one that was (and `stopped` says when and why)."""
        loss = self.loss(policy)
        if loss is None or self.before is None:
            return True
        self.curves.log(step, {"answer_loss": loss})
        if self.max_rise is None or loss - self.before <= self.max_rise:
            self.keep(policy)
            return True
        import torch

        with torch.no_grad():
            for name, param in policy.named_parameters():
                if name in self.kept:
                    param.copy_(self.kept[name])
        self.stopped = {"update": step, "answer_loss": round(loss, 4), "limit": round(self.before + self.max_rise, 4)}
        log.warning("update %d: held-out answer loss %.4f is above the sft model's %.4f + %.4f: stopping, "
                    "keeping the policy of update %d", step, loss, self.before, self.max_rise, step - 1)
        return False


# --- curves and progress -----------------------------------------------------------------------


def curve_row(logs: dict[str, Any]) -> dict[str, float]:
    """TRL's log row with the shared curve names (kl, reward, policy_loss, value_loss, entropy)."""
    return {CURVE_NAMES.get(k, k): v for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def rl_callback(curves: Curves, total: int, offset: int = 0, on_update: Any = None,
                guard: AnswerLossGuard | None = None, policy_of: Any = None, raise_to_stop: bool = False) -> Any:
    """Curves (at `offset` + the trainer's step: PPO restarts its count on resume), one progress
    line per update with rate and ETA, `on_update(step)` after each update, the drift `guard` on
    the policy `policy_of()` returns after each update (stopping the trainer, or raising
    `StopTraining` with `raise_to_stop`), and for the HF Trainer's own checkpoints a copy of the
    curve so a resumed run continues it."""
    import shutil

    from transformers import TrainerCallback

    class RlCallback(TrainerCallback):
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

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if guard is not None:  # a resumed run's weights are loaded by now
                guard.keep(policy_of())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            step = offset + state.global_step
            if guard is not None and not guard.within(policy_of(), step):
                control.should_training_stop = True
                if raise_to_stop:
                    raise StopTraining(step)
                return
            if on_update is not None:
                on_update(step)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir() and curves.path.exists():
                shutil.copy2(curves.path, folder / "curves.csv")

    return RlCallback()


def sample_rows(when: str, prompts: list[Prompt], responses: list[str], rewards: list[float]) -> list[dict[str, Any]]:
    return [{"id": p.id, "when": when, "prompt": p.messages[-1]["content"], "response": r, "reward": round(s, 4)}
            for p, r, s in zip(prompts, responses, rewards)]


def log_samples_table(rows: list[dict[str, Any]]) -> None:
    """The before/after table as an MLflow table (the jsonl is also an artifact of the report)."""
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file="ppo/samples_table.json")
    except Exception as err:  # a table view is not worth failing a finished run over
        log.debug("mlflow table logging failed: %s", err)


def frozen_dtype(precision: str) -> Any:
    """Dtype of the models that are not trained (reference, reward)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def plain(model: Any) -> Any:
    """The policy as a plain model: LoRA adapters merged into its weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# --- a resumable loop of our own ---------------------------------------------------------------


def rollout_order(n_prompts: int, total: int, seed: int) -> list[int]:
    """Prompt indices for `total` rollouts: a fresh seeded permutation per pass over the prompts,
    so a resumed run takes the same prompts the killed run would have."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < total:
        order.extend(rng.permutation(n_prompts).tolist())
    return order[:total]


def save_rng(path: Path) -> None:
    import random

    import numpy as np
    import torch

    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, path / "rng.pt")


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


def save_ppo_checkpoint(ckpt: Checkpoints, curves: Curves, step: int, trainer: Any) -> None:
    """Policy (or its adapters), value model, optimizer, scheduler and RNG after update `step`."""
    import torch

    path = ckpt.begin(step)
    path.mkdir(parents=True)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.policy.save_pretrained(path / "policy")
    unwrapped.value_model.save_pretrained(path / "value")
    torch.save(trainer.optimizer.state_dict(), path / "optimizer.pt")
    torch.save(trainer.lr_scheduler.state_dict(), path / "scheduler.pt")
    save_rng(path)
    ckpt.commit(path, curves)
