"""base: materialise the base model as a plain Hugging Face folder in `models/base/`.

Reads `base.model` (a hub id, a local folder, or a GGUF file, de-quantised) or builds
`base.from_scratch` (a random Llama-style model without a tokenizer: `tokenize` trains one).
Writes the model, its tokenizer when it has one, and `llm_forge.yaml`.

    python -m stages.base [--params params.yaml]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from stages.common.config import Paths, StageConfig, StageError, resolve_path
from stages.common.io import atomic_dir
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.base")

GGUF_MAGIC = b"GGUF"


class ScratchConfig(StageConfig):
    """A Llama-style decoder initialised at random."""

    vocab_size: int = Field(ge=64)
    """Embedding rows; `tokenize` trains a BPE of at most this size."""
    hidden_size: int = Field(ge=1)
    """Width of the residual stream."""
    intermediate_size: int = Field(ge=1)
    """Width of each MLP's hidden layer."""
    num_hidden_layers: int = Field(ge=1)
    """Decoder layers."""
    num_attention_heads: int = Field(ge=1)
    """Query heads per layer (divides hidden_size)."""
    num_key_value_heads: int = Field(ge=1)
    """Key/value heads per layer (divides num_attention_heads; fewer: grouped-query attention)."""
    max_position_embeddings: int = Field(ge=1)
    """Longest sequence the rotary embeddings are set up for."""
    tie_word_embeddings: bool
    """Share the input embedding with the output layer."""


class BaseConfig(StageConfig):
    model: str | None
    """Hub id, local model folder, or GGUF file (`pkg://package/file.gguf` inside a package)."""
    from_scratch: ScratchConfig | None
    """Architecture of a random-init model, instead of `model`."""
    dtype: Literal["float32", "bfloat16", "float16"]
    """Precision the weights are saved in (training stages choose their own compute dtype)."""
    seed: int
    """Seed of the random init (from_scratch only)."""

    @model_validator(mode="after")
    def _one_source(self) -> BaseConfig:
        if (self.model is None) == (self.from_scratch is None):
            raise ValueError("set exactly one of base.model and base.from_scratch")
        return self


# --- the steps -------------------------------------------------------------------------------


def locate(spec: str) -> tuple[str, str | None, str]:
    """(path or hub id, GGUF file name or None, kind) for a `base.model` value."""
    looks_local = spec.startswith(("pkg://", "/", "./", "../")) or spec.endswith(".gguf")
    try:
        path = resolve_path(spec)
    except FileNotFoundError as err:
        raise StageError(f"base.model: {err}") from None
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise StageError(f"base.model: {path} is not a GGUF file (no GGUF header) and not a model folder")
        return str(path.parent), path.name, "gguf"
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), None, "folder"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return locate(str(ggufs[0]))
        raise StageError(f"base.model: {path} has no config.json (and not exactly one .gguf file)")
    if looks_local or spec.count("/") > 1:
        raise StageError(f"base.model: {path} does not exist")
    return spec, None, "hub"


def load_pretrained(spec: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) loaded from a hub id, a folder or a GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf, kind = locate(spec)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    except OSError as err:
        hint = " (the hub is not reachable from here: use a local folder or GGUF file)" if kind == "hub" else ""
        raise StageError(f"base.model: cannot load '{spec}': {err}{hint}") from None
    except ValueError as err:
        raise StageError(f"base.model: '{spec}' is not a loadable model: {err}") from None
    if gguf:
        # A model loaded from GGUF keeps a quantization_config that save_pretrained refuses:
        # rebuild a plain model from its config and move the de-quantised weights over.
        config = AutoConfig.from_pretrained(where, **extra)
        config.quantization_config = None
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if real_missing or unexpected:
            raise StageError(f"base.model: GGUF weights of {spec} do not fit their config "
                             f"(missing {real_missing[:3]}, unexpected {unexpected[:3]})")
        if config.tie_word_embeddings:
            plain.tie_weights()
        model = plain
    return model, tokenizer, kind


def from_scratch(cfg: ScratchConfig, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**cfg.model_dump(), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# --- the stage -------------------------------------------------------------------------------


def run(cfg: BaseConfig, paths: Paths) -> dict[str, Any]:
    import torch

    if cfg.from_scratch is not None:
        model, tokenizer, kind = from_scratch(cfg.from_scratch, cfg.seed), None, "from_scratch"
    else:
        model, tokenizer, kind = load_pretrained(cfg.model)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        raise StageError(f"base.model: its tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{vocab} embedding rows")
    model = model.to(getattr(torch, cfg.dtype))
    model.generation_config.pad_token_id = model.config.pad_token_id
    with atomic_dir(paths.base) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "llm_forge.yaml").write_text(yaml.safe_dump({"base": cfg.model_dump(mode="json")}, sort_keys=False))
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in Path(paths.base).glob("*.safetensors"))
    log.info("base: %s model, %.1fM parameters, %.0f MB", kind, n_params / 1e6, size / 1e6)
    return {"source": kind, "parameters": n_params, "vocab_size": vocab, "has_tokenizer": tokenizer is not None,
            "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
            "dtype": cfg.dtype, "size_bytes": size}


def main(argv: list[str] | None = None) -> int:
    return run_stage("base", BaseConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
