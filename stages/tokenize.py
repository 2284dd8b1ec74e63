"""tokenize: split the deduplicated corpus, encode it, and pack it into fixed-length blocks.

Reads the corpus shards of `data/dedup/` and the tokenizer of `models/base/` (a BPE is trained when
it has none); writes `data/tokenized/`, a `datasets.DatasetDict` (`train`, `val`; column
`input_ids`) with `tokenizer/` and `llm_forge.yaml` beside it (README: "The data stages").

    python -m stages.tokenize [--params params.yaml]
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.datastage import DataStage
from stages.common.io import Tally, atomic_dir, is_val
from stages.common.runner import run_stage
from stages.common.shards import DataConfig, ShardTask, file_digest, iter_records, read_shard, write_arrays

log = logging.getLogger("llm_forge.tokenize")

READS = {"data": DataConfig}  # how the shards run (no dvc.yaml param: it never changes the output)


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


def train_bpe(texts: Iterable[str], vocab_size: int, cfg: BpeConfig) -> Any:
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


class Packer:
    """`pack` over documents that come a shard at a time: each call's full blocks go to an Arrow
    file at `path` (column `input_ids`, one record batch per call) and the tokens that do not fill
    a block wait for the next, so the blocks are `pack`'s over all the documents at once."""

    def __init__(self, path: Path, eos_id: int, block_size: int) -> None:
        import pyarrow as pa

        self.path, self.eos_id, self.block_size = path, eos_id, block_size
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32(), block_size))])
        self.writer = pa.ipc.new_file(str(path), self.schema)
        self.carry = np.zeros(0, np.int32)
        self.blocks = 0
        self.digest = hashlib.blake2b(digest_size=8)

    def add(self, docs: list[np.ndarray]) -> None:
        import pyarrow as pa

        if not docs:
            return
        eos = np.array([self.eos_id], dtype=np.int32)
        stream = np.concatenate([self.carry, *(part for doc in docs for part in (doc, eos))])
        n = len(stream) // self.block_size
        full = stream[: n * self.block_size]
        self.carry = stream[n * self.block_size:].copy()
        if n:
            self.writer.write_batch(pa.record_batch(
                [pa.FixedSizeListArray.from_arrays(pa.array(full, pa.int32()), self.block_size)], schema=self.schema))
            self.digest.update(full.tobytes())
            self.blocks += n

    def close(self) -> Any:
        """The blocks as a table read from the file (memory-mapped: not loaded), and the
        tokens left over."""
        import pyarrow as pa

        self.writer.close()
        return pa.ipc.open_file(pa.memory_map(str(self.path))).read_all(), len(self.carry)


# --- the stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """What every worker encodes with: the tokenizer's folder and the split."""

    tokenizer: Path
    cfg: TokenizeConfig


@functools.cache
def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)  # once per worker process


def encode_shard(task: ShardTask, enc: Encoding) -> dict[str, Any]:
    """One shard's documents, split and encoded: token ids and lengths per split to
    `tokens/corpus/part-N.npz`; returns the counts and the encoder's seconds."""
    records = read_shard(task.source, columns=["id", "text"]).to_pylist()
    tokenizer = _tokenizer(enc.tokenizer)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for doc in records:
        splits["val" if is_val(doc["id"], enc.cfg.split_salt, enc.cfg.val_fraction) else "train"].append(doc["text"])
    started = time.perf_counter()
    arrays, docs = {}, {}
    for name, texts in splits.items():
        ids = encode(tokenizer, texts, enc.cfg.batch_size)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        arrays[f"{name}_tokens"] = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        arrays[f"{name}_lengths"] = lengths
        docs[name] = len(texts)
    seconds = time.perf_counter() - started
    write_arrays(task.out("tokens").with_suffix(".npz"), arrays)
    return {"docs_in": len(records), "docs": docs, "seconds": seconds}


def _shard_docs(path: Path, split: str) -> list[np.ndarray]:
    """The encoded documents of one split of one shard, empty ones left out."""
    saved = np.load(path)
    lengths = saved[f"{split}_lengths"]
    return [d for d in np.split(saved[f"{split}_tokens"], np.cumsum(lengths)[:-1]) if len(d)] if lengths.size else []


def run(cfg: TokenizeConfig, paths: Paths, data: DataConfig) -> dict[str, Any]:
    import datasets
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    # the shards are packed into one dataset, in order: tokenize publishes it itself
    stage = DataStage("tokenize", paths.dedup, {"tokenized": paths.tokenized}, data, kinds=["corpus"])
    parts, tasks = stage.parts, stage.tasks
    if not sum(pq.ParquetFile(t.source).metadata.num_rows for t in tasks):
        raise StageError(f"{paths.dedup}/corpus holds no document")

    model_config = AutoConfig.from_pretrained(paths.base)
    vocab = model_config.vocab_size
    if (Path(paths.base) / "tokenizer_config.json").exists():
        tokenizer, trained = AutoTokenizer.from_pretrained(paths.base), False
    else:
        log.info("base model has no tokenizer: training a %d-token BPE on the train split", vocab)
        train_texts = (d["text"] for d in iter_records(paths.dedup, "corpus")
                       if not is_val(d["id"], cfg.split_salt, cfg.val_fraction))
        tokenizer, trained = train_bpe(train_texts, vocab, cfg.bpe), True
    if tokenizer.eos_token_id is None:
        raise StageError(f"the tokenizer of {paths.base} has no EOS token to put between documents")
    if len(tokenizer) > vocab:
        raise StageError(f"the tokenizer has {len(tokenizer)} tokens but the model in {paths.base} "
                         f"has {vocab} embedding rows")
    tokenizer.save_pretrained(str(parts / "tokenizer"))  # what the workers load
    key = json.dumps([cfg.model_dump(mode="json"),
                      [file_digest(f) for f in sorted((parts / "tokenizer").iterdir()) if f.is_file()]])
    results = stage.run(encode_shard, Encoding(parts / "tokenizer", cfg), key)

    tally = Tally()
    tally.docs_in = sum(r["docs_in"] for r in results)
    counted = {name: sum(r["docs"][name] for r in results) for name in ("train", "val")}
    if cfg.val_fraction > 0 and not counted["val"]:
        raise StageError(f"no document fell into the val split ({tally.docs_in} documents, "
                         f"val_fraction {cfg.val_fraction}): raise tokenize.val_fraction")
    metrics, blocks, digests = {}, {}, {}
    for name in ("train", "val"):
        packer = Packer(parts / f"blocks-{name}.arrow", tokenizer.eos_token_id, cfg.block_size)
        docs = tokens = 0
        for t in tasks:  # one shard's tokens in memory at a time
            kept = _shard_docs(t.out("tokens").with_suffix(".npz"), name)
            packer.add(kept)
            docs += len(kept)
            tokens += sum(len(x) for x in kept) + len(kept)
        blocks[name], leftover = packer.close()
        digests[name] = packer.digest.hexdigest()
        tally.drop("no_tokens", counted[name] - docs)
        tally.docs_out += docs
        metrics[name] = {"docs": docs, "tokens": int(tokens), "blocks": packer.blocks,
                         "tokens_not_in_a_block": int(leftover)}
        log.info("%s: %d docs -> %d blocks of %d", name, docs, packer.blocks, cfg.block_size)
    if metrics["train"]["blocks"] == 0 or (cfg.val_fraction > 0 and metrics["val"]["blocks"] == 0):
        raise StageError(f"a split holds fewer tokens than one block of {cfg.block_size} "
                         f"(train {metrics['train']['tokens']}, val {metrics['val']['tokens']}): "
                         "lower tokenize.block_size or add data")

    def as_dataset(name: str) -> datasets.Dataset:
        # the fingerprint a hash of the blocks, so the saved folder is the same on every run
        return datasets.Dataset(blocks[name], fingerprint=digests[name])

    with atomic_dir(paths.tokenized) as tmp:
        datasets.DatasetDict({k: as_dataset(k) for k in blocks}).save_to_disk(str(tmp))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "llm_forge.yaml").write_text(yaml.safe_dump({"tokenize": cfg.model_dump(mode="json")}, sort_keys=False))
    stage.clean_up()

    total_tokens = metrics["train"]["tokens"] + metrics["val"]["tokens"]
    encode_s = sum(r["seconds"] for r in results)
    return {**tally.as_metrics(), **metrics, "shards": len(tasks), "tokenizer_trained": trained,
            "vocab_size": len(tokenizer), "tokens": total_tokens,
            "tokens_per_second": round(total_tokens / max(encode_s, 1e-9))}


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", TokenizeConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
