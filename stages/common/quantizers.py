"""4-bit quantizers that run on a CPU as on a GPU: GPTQ through GPTQModel, and HQQ.

`stages/quantize.py` calls each as `quantizer(cfg, src, paths, tokenizer)` and saves what it
returns with `.save_pretrained(folder)`; `lm.load_causal_lm` loads each folder back quantized.

- GPTQ (GPTQModel, the maintained successor of AutoGPTQ): second-order rounding, layer by layer,
  calibrated on train blocks of `data/tokenized` (token ids as they are, no decode and re-encode).
  On a CPU it quantizes and packs with GPTQModel's torch backend (no kernel to compile); the
  folder is a standard GPTQ checkpoint that `from_pretrained` loads (transformers + optimum +
  gptqmodel).
- HQQ (the `hqq` library): calibration-free half-quadratic fitting of a scale and a zero point
  per group. transformers' `HqqConfig` path neither quantizes nor saves in transformers 5, so the
  folder is hqq's own (`config.json` + `qmodel.pt`); its config.json carries a
  `quantization_config` with `quant_method: hqq` so that the pipeline (and the registered model)
  know to load it through hqq.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import lm
from stages.common.config import StageConfig

# Every method quantizes only the linear layers of the decoder blocks; the embedding (shared with
# a tied lm_head: a large share of a small model) and the norms stay in the dtype the model is
# loaded in, and are stored in this one. bf16 has fp32's exponent range, so nothing overflows, it
# is the dtype such models are released in, and it halves what stays unquantized
# (`python -m bench.quantize_bench` measures bf16 against fp32 there).
KEEP_DTYPE = "bfloat16"


class CalibratedOptions(StageConfig):
    """GPTQ settings (`quantize.gptq`)."""

    bits: Literal[2, 3, 4, 8]
    """Bits per weight."""
    group_size: int = Field(ge=-1)
    """Weights of one input row sharing a scale (-1: one per output row); must divide the layers'
    input sizes. 32 with sym false is the Q4_1 GGUF grid."""
    sym: bool
    """Symmetric (a scale per group) or asymmetric (a scale and a zero point: fits skewed groups)."""
    calibration_blocks: int = Field(ge=1)
    """Train blocks of data/tokenized that calibrate the quantization."""
    calibration: Literal["head", "spread"]
    """Which train blocks: the first ones (head: one document or two) or evenly spaced over the
    whole train split (spread: every source of the corpus)."""

    @field_validator("group_size")
    @classmethod
    def _group(cls, size: int) -> int:
        if size == 0:
            raise ValueError("a group holds at least one weight (-1: one group per row)")
        return size


class HQQOptions(StageConfig):
    """HQQ settings (`quantize.hqq`); HQQ is always asymmetric (a scale and a zero point per group)."""

    bits: Literal[1, 2, 3, 4, 8]
    """Bits per weight."""
    group_size: int = Field(ge=8, multiple_of=8)
    """Weights sharing a scale and a zero point (a multiple of 8 dividing the layers' sizes)."""
    axis: Literal[0, 1]
    """Grouping axis: 1 groups along the input (GPTQ's and GGUF's way), 0 along the output."""


def calibration_ids(paths: Any, n_blocks: int, which: str) -> list[list[int]]:
    """`n_blocks` train blocks of data/tokenized (the first ones, or evenly spaced over the split),
    as token id lists."""
    import datasets

    train = datasets.load_from_disk(str(paths.tokenized))["train"]
    n = min(n_blocks, len(train))
    rows = range(n) if which == "head" else [i * len(train) // n for i in range(n)]
    return [list(map(int, ids)) for ids in train.select(rows)["input_ids"]]


def quantize_gptq(opts: Any, src: Path, paths: Any, tokenizer: Any, **gptqmodel: Any) -> Any:
    """GPTQ with GPTQModel; the quantized model (GPTQModel's wrapper, whose `save_pretrained`
    writes a standard checkpoint). `gptqmodel`: more of GPTQModel's `QuantizeConfig` (what
    `bench/quantize_bench.py` varies, e.g. `damp_percent`)."""
    import torch

    lm.gptqmodel_env()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel import QuantizeConfig as GPTQModelConfig

    cuda = torch.cuda.is_available()
    # offload_to_disk (GPTQModel's default) would write the model's layers to a /tmp folder of its own
    q = GPTQModelConfig(**{"bits": opts.bits, "group_size": opts.group_size, "sym": opts.sym, "desc_act": False,
                           "offload_to_disk": False, **gptqmodel})
    dtype = torch.float16 if cuda else torch.float32  # on a CPU, fp32 activations
    model = GPTQModel.load(str(src), q, device="cuda" if cuda else "cpu", dtype=dtype)
    blocks = calibration_ids(paths, opts.calibration_blocks, opts.calibration)
    model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in blocks], batch_size=1,
                   tokenizer=tokenizer, backend=BACKEND.AUTO if cuda else BACKEND.TORCH)
    return GPTQModelFolder(model)


class GPTQModelFolder:
    """GPTQModel's quantized model, saved as a checkpoint whose unquantized parts are bf16."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def save_pretrained(self, folder: Path) -> None:
        import torch

        inner = self.model.model
        for module in inner.modules():  # embedding and norms: the quantized layers hold int32 buffers
            if not hasattr(module, "qweight"):
                for p in module.parameters(recurse=False):
                    if p.is_floating_point():
                        p.data = p.data.to(getattr(torch, KEEP_DTYPE))
        self.model.save(str(folder))


def quantize_hqq(opts: Any, src: Path, compute_dtype: str | None = None, **weight: Any) -> Any:
    """HQQ with the `hqq` library, on the unquantized model in fp32 (fp16 on a GPU) or
    `compute_dtype`. `weight`: more of hqq's weight settings (what `bench/quantize_bench.py`
    varies, e.g. `optimize`)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, compute_dtype) if compute_dtype else torch.float16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()
    q = BaseQuantizeConfig(nbits=opts.bits, group_size=opts.group_size, axis=opts.axis)
    q["weight_quant_params"].update(weight)
    AutoHQQHFModel.quantize_model(model, quant_config=q, compute_dtype=dtype, device="cuda" if cuda else "cpu")
    return HQQFolder(model, {"quant_method": "hqq", "nbits": opts.bits, "group_size": opts.group_size,
                             "axis": opts.axis, "compute_dtype": str(dtype).removeprefix("torch.")})


class HQQFolder:
    """An HQQ-quantized model, saved as hqq saves it, with its settings in config.json."""

    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self.model, self.settings = model, settings

    def save_pretrained(self, folder: Path) -> None:
        import torch
        from hqq.models.hf.base import AutoHQQHFModel

        for module in self.model.modules():
            if not hasattr(module, "W_q"):  # HQQLinear keeps its own packed weight and scales
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(getattr(torch, KEEP_DTYPE))
        Path(folder).mkdir(parents=True, exist_ok=True)
        AutoHQQHFModel.save_quantized(self.model, str(folder))
        config = json.loads((Path(folder) / "config.json").read_text())
        config["quantization_config"] = self.settings
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
