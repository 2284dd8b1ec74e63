"""Loading, measuring and running a finished causal LM: shared by `quantize`, `evaluate`, `register`.

Both stages open model folders the pipeline wrote (plain or quantized: `from_pretrained` reads
the `quantization_config` a quantized folder carries; an HQQ folder, which transformers cannot
load, goes through the `hqq` library, and a GPTQ folder on a CPU through GPTQModel's torch kernel,
which needs no compiling), and both report the same held-out
perplexity on `data/tokenized`'s val split and the same greedy-generation speed, so that the
numbers in the quantization table and in the evaluation table are one measurement, not two.
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path
from typing import Any

from stages.common.config import StageError


def folder_size_mb(path: Path) -> float:
    """Bytes on disk of every file under `path`, in MB (10^6)."""
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 2)


def read_config(model_dir: Path) -> dict[str, Any]:
    """The folder's config.json, or {} when it has none or it does not parse (loading the folder
    then fails with the reason)."""
    import json

    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def stored_dtype(config: dict[str, Any]) -> str:
    """The dtype a folder's weights are stored in, as its config.json (`config`) names it
    (transformers 5 writes `dtype`, earlier versions `torch_dtype`; float32 where it names none)."""
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def load_tokenizer(model_dir: Path, fallback: Path | None = None) -> Any:
    """The tokenizer saved beside the model, else `fallback` (a from-scratch base has none:
    `tokenize` trained the one every later model uses, in `data/tokenized/tokenizer`)."""
    from transformers import AutoTokenizer

    for where in (model_dir, fallback):
        if where is not None and (Path(where) / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(where))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok
    raise StageError(f"{model_dir} has no tokenizer (and no fallback tokenizer at {fallback})")


def load_chat_tokenizer(folder: Path, why: str) -> Any:
    """The tokenizer in `folder`, which must hold a chat template (`why` says what is rendered
    with it), with a pad token. No fallback, unlike `load_tokenizer`: a model trained on conversations
    carries the template it was trained with."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise StageError(f"{folder} holds no tokenizer that loads ({err})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(f"the tokenizer in {folder} has no chat template: {why}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def gptqmodel_env() -> None:
    """Settings GPTQModel reads at import: as many CPU workers as cores (its default, half the
    cores, fails to start on a 2-core machine), and its pure-torch packing instead of a C++
    extension it would compile on first use. An explicit setting in the environment wins."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


def quant_method(model_dir: Path) -> str | None:
    """The `quant_method` of the folder's quantization_config (None: not quantized)."""
    return (read_config(model_dir).get("quantization_config") or {}).get("quant_method")


def load_hqq(model_dir: Path, dtype: Any = None, device_map: Any = None) -> Any:
    """An HQQ folder (hqq's `config.json` + `qmodel.pt`), computing in `dtype` (default: the one it
    was quantized with)."""
    import torch
    from hqq.models.hf.base import AutoHQQHFModel

    if dtype is None or dtype == "auto":
        dtype = (read_config(model_dir).get("quantization_config") or {}).get("compute_dtype", "float32")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = "cuda" if device_map is not None and torch.cuda.is_available() else "cpu"
    model = AutoHQQHFModel.from_quantized(str(model_dir), compute_dtype=dtype, device=device)
    # Our settings, not transformers' HqqConfig: code that reads model.config.quantization_config
    # as one (lm-eval's HFLM does) must not try to rebuild a quantizer transformers cannot run.
    model.config.quantization_config = None
    return model


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 in hardware: a CUDA GPU with bf16, or (without CUDA)
    a CPU with AVX512-BF16 or AMX. Elsewhere torch runs bf16 matmuls through fp32 conversions,
    several times slower than fp32 itself (`python -m bench.dtype_bench` measures it)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(dtype: str) -> str | None:
    """The dtype a model is loaded in for `dtype`: `hardware` is bfloat16 where this machine computes
    it natively and float32 elsewhere; `auto` is None (as the folder stores it); any other, itself."""
    if dtype == "hardware":
        return "bfloat16" if native_bf16() else "float32"
    return None if dtype == "auto" else dtype


def load_causal_lm(model_dir: Path, dtype: Any = None, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(model_dir)` in eval mode, in `dtype` (None: as the
    folder stores it; `resolve_dtype` gives it for a config's value), an HQQ folder through hqq,
    a GPTQ folder on a CPU with GPTQModel's torch kernel; a folder that does not load is a
    StageError naming it (the caller records a skip, not a crash)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir} is not a model folder (no config.json)")
    architectures = read_config(model_dir).get("architectures") or []
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        # a reward model (a sequence classifier) would load with a random lm_head and score noise
        raise StageError(f"{model_dir} holds a {', '.join(architectures)}, not a causal LM")
    method = quant_method(model_dir)
    try:
        if method == "hqq":
            return load_hqq(model_dir, dtype, kwargs.get("device_map")).eval()
        if method == "gptq":
            gptqmodel_env()
        if method == "gptq" and "quantization_config" not in kwargs:
            import torch
            from transformers import GPTQConfig

            # GPTQModel's default CPU kernel (AVX-512) compiles itself for minutes on first use
            backend = "auto" if torch.cuda.is_available() else "torch"
            kwargs["quantization_config"] = GPTQConfig(bits=read_config(model_dir)["quantization_config"]["bits"],
                                                       backend=backend)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as err:  # any loader failure is "this folder does not load"
        raise StageError(f"{model_dir} does not load: {type(err).__name__}: {str(err)[:300]}") from err
    return model.eval()


def quantized_layers(model: Any) -> tuple[int, int]:
    """(quantized, all) linear layers: a quantized one holds its weight as a bitsandbytes or torchao
    tensor subclass, as integers, (GPTQ) as packed `qweight`, or (HQQ) as packed `W_q`."""
    import torch

    quantized = total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "qweight") or hasattr(module, "W_q"):
            quantized, total = quantized + 1, total + 1
        elif isinstance(module, torch.nn.Linear) and weight is not None:
            total += 1
            quantized += type(weight) not in (torch.nn.Parameter, torch.Tensor) or not weight.is_floating_point()
    return quantized, total


def free() -> None:
    """Give back the memory of the model just dropped, before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def val_blocks(tokenized: Path, max_blocks: int | None) -> Any:
    """The first `max_blocks` packed blocks of the val split, as a LongTensor [n, block]."""
    import datasets
    import numpy as np
    import torch

    try:
        val = datasets.load_from_disk(str(tokenized))["val"]
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise StageError(f"{tokenized} has no tokenized val split (run the tokenize stage): {err}") from None
    if max_blocks is not None:
        val = val.select(range(min(max_blocks, len(val))))
    if len(val) == 0:
        raise StageError(f"{tokenized}: the val split is empty")
    return torch.from_numpy(np.stack(val.with_format("numpy")["input_ids"]).astype(np.int64))


def block_losses(model: Any, blocks: Any, batch_size: int = 4) -> list[float]:
    """Mean next-token loss of each of `blocks` (a held-out item each, for error bars and paired
    comparisons); a StageError when the blocks hold ids outside the model's vocabulary."""
    import torch

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    if int(blocks.max()) >= vocab:
        raise StageError(f"the val blocks hold token id {int(blocks.max())} but the model's vocabulary is "
                         f"{vocab}: it was not trained on this tokenizer")
    losses: list[float] = []
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size].to(device)
            hidden = last_hidden(model, ids)
            if hidden is None:
                logits = model(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                losses.extend(loss.mean(dim=1).tolist())
                continue
            head = model.get_output_embeddings()
            for row, target in zip(hidden[:, :-1], ids[:, 1:]):  # one block's logits at a time: less memory
                losses.append(torch.nn.functional.cross_entropy(head(row).float(), target).item())
    return losses


def last_hidden(model: Any, ids: Any, mask: Any = None) -> Any:
    """The decoder's last hidden states (the output layer's input) of `ids`, for a model whose
    logits are just its output layer applied to them, position by position; None for one whose
    forward does more after the output layer (logit scaling or soft-capping) or that does not
    expose its decoder and output layer (the caller then takes the full forward's logits)."""
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder(input_ids=ids, attention_mask=mask).last_hidden_state


def perplexity(model: Any, blocks: Any, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over `blocks`, every token weighted alike (blocks are equally long)."""
    losses = block_losses(model, blocks, batch_size)
    return round(math.exp(min(sum(losses) / len(losses), 50.0)), 4)


def answer_losses(model: Any, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 4) -> list[float]:
    """Mean loss over the answer tokens of each conversational prompt/completion example (sft's
    format), rendered with the tokenizer's chat template as the trainer renders it."""
    import torch

    device = next(model.parameters()).device
    rows = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                             return_dict=True)["input_ids"]
        rows.append((list(full), len(prompt)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # batches of like length: little padding
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            chosen = order[i:i + batch_size]
            batch = [rows[j] for j in chosen]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in batch], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in batch], device=device)
            labels = torch.full_like(ids, -100)
            for j, (r, start) in enumerate(batch):
                labels[j, start:len(r)] = ids[j, start:len(r)]
            target = labels[:, 1:]
            scored = target != -100
            logits = answer_logits(model, ids, mask, scored)
            if logits is None:  # the whole sequence's logits; only the answer positions count
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
            loss = torch.nn.functional.cross_entropy(logits.float(), target[scored], reduction="none")
            counts = scored.sum(dim=1)
            sums = torch.zeros(len(batch), dtype=loss.dtype).index_add_(
                0, scored.nonzero()[:, 0].cpu(), loss.cpu())
            for j, value in zip(chosen, (sums / counts.cpu().clamp(min=1)).tolist()):
                losses[j] = value
    return losses


def answer_logits(model: Any, ids: Any, mask: Any, scored: Any) -> Any:
    """Logits of the positions `scored` marks (those predicting an answer token) only: the output
    layer (a vocabulary-wide matmul) and the loss skip every prompt and padding position. The same
    numbers as the full forward's logits there; None where `last_hidden` gives none."""
    hidden = last_hidden(model, ids, mask)
    return None if hidden is None else model.get_output_embeddings()(hidden[:, :-1][scored])


def generation_speed(model: Any, tokenizer: Any, prompt: list[int], new_tokens: int, repeats: int = 1) -> float:
    """Tokens/s of greedy generation of exactly `new_tokens` tokens after the token ids `prompt`
    (best of `repeats`, after one short warm-up), batch size 1: the latency a chat user sees."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens,
              "pad_token_id": tokenizer.pad_token_id, "attention_mask": torch.ones_like(ids)}
    best = 0.0
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            made = out.shape[1] - ids.shape[1]
            best = max(best, made / (time.perf_counter() - start))
    return round(best, 2)


def greedy(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int, *,
           stop_id: int | None = None, pad_id: int | None = None, batch_size: int = 8) -> list[str]:
    """Greedy answers to `prompts`, decoded without special tokens: the one generator of the
    pipeline's samples and checks. A prompt is text, a chat (a list of messages, rendered with the
    tokenizer's chat template and a generation prompt) or token ids. Prompts are batched by length
    (shortest first; answers come back in the prompts' order) and left-padded, with an attention
    mask, so padding does not enter an answer (in bfloat16 the kernels a batch's shape picks can
    still move a near-tie token); each stops at `stop_id` (default: EOS)."""
    import torch
    from transformers import GenerationConfig

    def ids_of(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(tokenizer(prompt)["input_ids"])
        if prompt and isinstance(prompt[0], dict):
            return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
        return list(prompt)

    stop_id = tokenizer.eos_token_id if stop_id is None else stop_id
    pad_id = next((p for p in (pad_id, tokenizer.pad_token_id, stop_id) if p is not None), 0)
    device = next(model.parameters()).device
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_id, pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    encoded = [ids_of(p) for p in prompts]
    # Batches of like length (the order given back is the prompts'): a batch is padded to its
    # longest prompt, and one long prompt among short ones made every row of its batch pay for it.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [encoded[i] for i in chosen]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for i, row in zip(chosen, seqs[:, width:].tolist()):
            if stop_id in row:
                row = row[:row.index(stop_id)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return out
