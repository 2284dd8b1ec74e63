"""Packed token blocks (`data/tokenized`, made by the tokenize stage): loading them checked
against a model, batching them in a seeded, resumable order, and their held-out loss. The
pretrain stage trains on them; anything that measures perplexity on them reads them here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.config import Paths, StageError


def load_blocks(paths: Paths, model_config: Any) -> Any:
    """The tokenized DatasetDict, checked against the model: StageError before any training."""
    import datasets
    import pyarrow.compute as pc

    folder = Path(paths.tokenized)
    try:
        dsd = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"{folder} is not a tokenized DatasetDict (run the tokenize stage): {err}") from None
    missing = [s for s in ("train", "val") if s not in dsd]
    if missing or "input_ids" not in dsd["train"].column_names:
        raise StageError(f"{folder} lacks {missing or 'the input_ids column'}")
    vocab = model_config.vocab_size
    max_pos = getattr(model_config, "max_position_embeddings", None)
    for split in ("train", "val"):
        ds = dsd[split]
        if len(ds) == 0:
            continue
        column = ds.data.column("input_ids")
        block = len(ds[0]["input_ids"])
        top = pc.max(pc.list_flatten(column)).as_py()
        if top is not None and top >= vocab:
            raise StageError(f"{folder} ({split}) holds token id {top} but the model in {paths.base} "
                             f"has a vocabulary of {vocab}: the data was tokenized for another model "
                             "(rerun tokenize)")
        if max_pos is not None and block > max_pos:
            raise StageError(f"{folder} holds blocks of {block} tokens but the model in {paths.base} "
                             f"takes at most {max_pos} positions: lower tokenize.block_size")
    return dsd.with_format("numpy")


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))}


def loader(ds: Any, batch_size: int, order: np.ndarray | None, drop_last: bool) -> Any:
    import torch
    from torch.utils.data import DataLoader

    # A plain list of indices as the sampler: the order is ours (seeded per epoch), so a resumed
    # run sees exactly the batches an uninterrupted one would, and accelerate can still shard it.
    # Its own generator: a DataLoader iterator draws a seed, which must not come from (and shift)
    # the global RNG that dropout uses and a checkpoint restores.
    sampler = order.tolist() if order is not None else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(0))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def micro_batches(accelerator: Any, ds: Any, batch_size: int, seed: int, shuffle: bool,
                  start: int) -> Iterator[dict[str, Any]]:
    """Train micro-batches forever (epoch after epoch), starting after the first `start`."""
    def epoch_loader(epoch: int) -> Any:
        return accelerator.prepare_data_loader(
            loader(ds, batch_size, epoch_order(len(ds), seed, epoch, shuffle), drop_last=True))

    first = epoch_loader(0)
    per_epoch = len(first)
    epoch, skip = divmod(start, per_epoch)
    dl = first if epoch == 0 else epoch_loader(epoch)
    while True:
        yield from accelerator.skip_first_batches(dl, skip) if skip else dl
        epoch, skip = epoch + 1, 0
        dl = epoch_loader(epoch)


def evaluate(accelerator: Any, model: Any, val_loader: Any, max_batches: int) -> float | None:
    """Mean next-token loss over the first `max_batches` val micro-batches (all processes)."""
    import torch

    if max_batches == 0 or val_loader is None:
        return None
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    rows = 0
    with torch.no_grad():
        for i, batch in enumerate(val_loader):
            if i >= max_batches:
                break
            ids = batch["input_ids"]  # every block has the same length: weigh batches by rows
            loss_sum += model(input_ids=ids, labels=ids).loss.double() * ids.shape[0]
            rows += ids.shape[0]
    model.train()
    total = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(rows)]), "sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else round(math.exp(min(loss, 50.0)), 4)
