"""tokenize: split the deduplicated corpus, encode it, and pack it into fixed-length blocks.

Reads `data/dedup/corpus.parquet` and the tokenizer of `models/base/`; when the base model has
none (a from-scratch model), trains a byte-level BPE of the model's vocabulary size on the
train split. Documents go to train or val by a salted hash of their id (stable when documents
are added or removed), are encoded by the tokenizer's batch encoder, joined with EOS between
them and cut into `block_size` blocks. Writes `data/tokenized/` as a `datasets.DatasetDict`
(`train`, `val`; column `input_ids`) plus `tokenizer/`, so any HF tool opens it, and
`llm_forge.yaml`, the resolved config.

    python -m stages.tokenize [--params params.yaml]
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import Tally, atomic_dir, is_val, read_records
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.tokenize")


class BpeConfig(StageConfig):
    """The tokenizer trained when the base model has none."""

    min_frequency: int = Field(ge=1)
    """Merges seen fewer times than this are not learned."""
    special_tokens: list[str] = Field(min_length=3)
    """Special tokens, in id order; the first three are pad, bos and eos."""


class TokenizeConfig(StageConfig):
    block_size: int = Field(ge=8)
    """Tokens per training block."""
    val_fraction: float = Field(ge=0.0, lt=1.0)
    """Share of documents held out for validation (perplexity)."""
    split_salt: str
    """Salt of the id hash that assigns documents to train or val; change it to reshuffle."""
    batch_size: int = Field(ge=1)
    """Documents per call of the batch encoder."""
    bpe: BpeConfig
    """The tokenizer trained when the base model has none (a from-scratch base)."""


# --- the steps -------------------------------------------------------------------------------


def train_bpe(texts: list[str], vocab_size: int, cfg: BpeConfig) -> Any:
    """A byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=cfg.special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    pad, bos, eos = cfg.special_tokens[:3]
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos,
                                      additional_special_tokens=cfg.special_tokens[3:])
    wrapped.chat_template = CHATML  # so that SFT renders chat data the same way for every base
    return wrapped


# ChatML, as SmolLM2 uses it: the template the trained tokenizer gets.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def encode(tokenizer: Any, texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), through the Rust batch encoder."""
    backend = tokenizer.backend_tokenizer
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        batch = backend.encode_batch_fast(texts[start : start + batch_size], add_special_tokens=False)
        out.extend(np.asarray(e.ids, dtype=np.int32) for e in batch)
    return out


def pack(docs: list[np.ndarray], eos_id: int, block_size: int) -> tuple[np.ndarray, int]:
    """Documents joined with EOS after each, cut into full blocks: (blocks, tokens left over)."""
    if not docs:
        return np.zeros((0, block_size), dtype=np.int32), 0
    eos = np.array([eos_id], dtype=np.int32)
    stream = np.concatenate([part for doc in docs for part in (doc, eos)])
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size), len(stream) - n_blocks * block_size


# --- the stage -------------------------------------------------------------------------------


def run(cfg: TokenizeConfig, paths: Paths) -> dict[str, Any]:
    import datasets
    import pyarrow as pa
    from transformers import AutoConfig, AutoTokenizer

    docs = read_records(paths.dedup, "corpus")
    if not docs:
        raise StageError(f"{paths.dedup}/corpus.parquet holds no document")
    tally = Tally()
    tally.docs_in = len(docs)
    splits = {"train": [], "val": []}
    for doc in docs:
        splits["val" if is_val(doc["id"], cfg.split_salt, cfg.val_fraction) else "train"].append(doc)
    if cfg.val_fraction > 0 and not splits["val"]:
        raise StageError(f"no document fell into the val split ({len(docs)} documents, "
                         f"val_fraction {cfg.val_fraction}): raise tokenize.val_fraction")

    model_config = AutoConfig.from_pretrained(paths.base)
    vocab = model_config.vocab_size
    if (Path(paths.base) / "tokenizer_config.json").exists():
        tokenizer, trained = AutoTokenizer.from_pretrained(paths.base), False
    else:
        log.info("base model has no tokenizer: training a %d-token BPE on the train split", vocab)
        tokenizer, trained = train_bpe([d["text"] for d in splits["train"]], vocab, cfg.bpe), True
    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer of {paths.base} has no EOS token to put between documents")
    if len(tokenizer) > vocab:
        raise StageError(f"the tokenizer has {len(tokenizer)} tokens but the model in {paths.base} "
                         f"has {vocab} embedding rows")

    encode_s, metrics, blocks = 0.0, {}, {}
    for name, split_docs in splits.items():
        started = time.perf_counter()
        ids = encode(tokenizer, [d["text"] for d in split_docs], cfg.batch_size)
        encode_s += time.perf_counter() - started
        kept = [x for x in ids if len(x)]
        tally.drop("no_tokens", len(ids) - len(kept))
        tally.docs_out += len(kept)
        blocks[name], leftover = pack(kept, tokenizer.eos_token_id, cfg.block_size)
        metrics[name] = {"docs": len(kept), "tokens": int(sum(len(x) for x in kept) + len(kept)),
                         "blocks": int(len(blocks[name])), "tokens_not_in_a_block": int(leftover)}
        log.info("%s: %d docs -> %d blocks of %d", name, len(kept), len(blocks[name]), cfg.block_size)
    tally.check("tokenize")
    if len(blocks["train"]) == 0 or (cfg.val_fraction > 0 and len(blocks["val"]) == 0):
        raise StageError(f"a split holds fewer tokens than one block of {cfg.block_size} "
                         f"(train {metrics['train']['tokens']}, val {metrics['val']['tokens']}): "
                         "lower tokenize.block_size or add data")

    def as_dataset(arr: np.ndarray) -> datasets.Dataset:
        flat = pa.array(arr.reshape(-1), type=pa.int32())
        column = pa.FixedSizeListArray.from_arrays(flat, cfg.block_size)
        return datasets.Dataset(pa.table({"input_ids": column}))

    with atomic_dir(paths.tokenized) as tmp:
        datasets.DatasetDict({k: as_dataset(v) for k, v in blocks.items()}).save_to_disk(str(tmp))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "llm_forge.yaml").write_text(yaml.safe_dump({"tokenize": cfg.model_dump(mode="json")}, sort_keys=False))

    total_tokens = metrics["train"]["tokens"] + metrics["val"]["tokens"]
    return {**tally.as_metrics(), **metrics, "tokenizer_trained": trained, "vocab_size": len(tokenizer),
            "tokens": total_tokens, "tokens_per_second": round(total_tokens / max(encode_s, 1e-9))}


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", TokenizeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
