"""Preference pairs for offline policy optimisation (`stages/reference.py`, `stages/dpo.py`): the
`policy` part of the preference data (`stages/common/preferences.py` says what the parts are), each
pair tokenized as TRL's DPO and KTO trainers tokenize a conversational pair, and the summed
log-probability a causal LM gives each answer. Both stages that read pairs here tokenize them with
`tokenize`, so the reference stage's cached log-probabilities belong to exactly the tokens `dpo`
trains on.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.config import StageError
from stages.common.preferences import POLICY, SPLIT, pair_messages, pair_texts

log = logging.getLogger("llm_forge.policy_pairs")

# data/reference/: the scored pairs, and which sft model scored them
PAIRS_FILE = "pairs.parquet"
META_FILE = "reference.json"
RENDERED = "the pairs are rendered with it"  # why the sft tokenizer needs its chat template


@dataclass
class Pair:
    id: str
    source: str
    prompt: str
    chosen: str
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def length(self) -> int:
        """Tokens of prompt + the longer answer: what one forward pass of the pair reads."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, answer ids) as TRL's DPOTrainer and KTOTrainer tokenize the conversational
    example `preferences.pair_messages` makes of it: the prompt rendered with a generation prompt,
    the answer the rest of the rendered prompt + answer. None when the rendered prompt is not the
    start of the rendered conversation (a template that rewrites earlier turns): TRL would then
    train on the wrong tokens."""
    messages = pair_messages(prompt, answer, answer)
    prompt_ids = list(tokenizer.apply_chat_template(messages["prompt"], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    full = list(tokenizer.apply_chat_template(messages["prompt"] + messages["chosen"], tokenize=True,
                                              return_dict=True)["input_ids"])
    if full[: len(prompt_ids)] != prompt_ids:
        return None
    return prompt_ids, full[len(prompt_ids):]


def policy_records(records: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records of the policy part, and how many records each part holds."""
    if records and SPLIT not in records[0]:
        raise StageError(f"{where} has no `{SPLIT}` column: the preference data must say which part "
                         f"(reward, judge, policy, test) each pair belongs to (rerun collect)")
    parts = Counter(str(r.get(SPLIT)) for r in records)
    return [r for r in records if r.get(SPLIT) == POLICY], dict(sorted(parts.items()))


def prepare_pairs(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[Pair], Counter]:
    """Tokenized pairs, and reason -> count of the records skipped: a missing or empty answer, two
    identical answers, a pair whose prompt + longer answer exceeds `max_length` tokens (never
    truncated: a cut answer is another answer), a template that does not render the prompt as a
    prefix of the conversation."""
    pairs, dropped = [], Counter()
    for r in records:
        (prompt, chosen, rejected), problem = pair_texts(r)
        if problem:
            dropped[problem] += 1
            continue
        tokens = [tokenize(tokenizer, prompt, answer) for answer in (chosen, rejected)]
        if tokens[0] is None or tokens[1] is None:
            dropped["template_not_prefix"] += 1
            continue
        (prompt_ids, chosen_ids), (_, rejected_ids) = tokens
        pair = Pair(r["id"], r.get("source") or "", prompt, chosen, rejected, prompt_ids, chosen_ids, rejected_ids)
        if pair.length > max_length:
            dropped["too_long"] += 1
            continue
        pairs.append(pair)
    return pairs, dropped


def pair_order(pair_id: str, salt: str) -> bytes:
    """A salted hash of a pair's id: the order in which a capped stage takes pairs, stable when
    other pairs come or go."""
    return hashlib.blake2b(f"{salt}\x00{pair_id}".encode(), digest_size=8).digest()


def answer_logps(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int,
                 pad_id: int) -> list[float]:
    """The summed log-probability `model` gives each answer after its prompt ((prompt ids, answer
    ids) per row), in the rows' order: TRL's `compute_ref_log_probs` (the log-softmax of the
    logits that predict each answer token, summed), computed only at the answer positions. A
    progress line (rows done, rate, ETA) after every tenth of the batches."""
    import time

    import torch

    from stages.common.lm import last_hidden

    device = next(model.parameters()).device
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))  # little padding
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    every = max(1, len(order) // batch_size // 10) * batch_size
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            if start and start % every == 0:
                rate = start / (time.perf_counter() - started)
                log.info("scored %d/%d answers, %.1f answers/s, ETA %.0f s", start, len(rows), rate,
                         (len(rows) - start) / rate)
            chosen = order[start:start + batch_size]
            seqs = [rows[i][0] + rows[i][1] for i in chosen]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
            scored = torch.zeros_like(ids[:, 1:], dtype=torch.bool)  # positions whose next token is an answer token
            for j, i in enumerate(chosen):
                p, a = len(rows[i][0]), len(rows[i][1])
                scored[j, p - 1 : p - 1 + a] = True
            hidden = last_hidden(model, ids, mask)
            if hidden is None:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
            else:
                logits = model.get_output_embeddings()(hidden[:, :-1][scored])
            logits = logits.float()
            targets = ids[:, 1:][scored]
            token_logps = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            sums = torch.zeros(len(chosen), dtype=torch.float64).index_add_(
                0, scored.nonzero()[:, 0].cpu(), token_logps.double().cpu())
            for i, value in zip(chosen, sums.tolist()):
                out[i] = value
    model.train(was_training)
    return out


def model_hash(folder: Path) -> str:
    """A model folder's content hash as DVC computes it: which sft model the cached log-probs belong to."""
    from stages.common.lineage import dvc_hash

    return dvc_hash(folder)


def read_scored(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pairs the reference stage scored (`PAIRS_FILE`) and what scored them (`META_FILE`)."""
    import json

    import pyarrow.parquet as pq

    if not (Path(folder) / PAIRS_FILE).is_file() or not (Path(folder) / META_FILE).is_file():
        raise StageError(f"{folder} holds no scored pairs ({PAIRS_FILE}, {META_FILE}): run the reference stage first")
    return pq.read_table(Path(folder) / PAIRS_FILE).to_pylist(), json.loads((Path(folder) / META_FILE).read_text())
