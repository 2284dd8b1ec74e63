"""The registered model: an MLflow pyfunc that loads a Hugging Face causal LM folder and
continues prompts greedily.

`stages/register.py` logs this file as an MLflow "model from code" with the model folder as the
artifact `model`; MLflow copies the file into the logged model and runs it wherever the model is
loaded (`mlflow.pyfunc.load_model("models:/llm-forge@candidate")`), where llm-forge is not
installed. So it imports only mlflow, transformers and torch, and those inside `load_context`.

The folder may be plain or quantized: `from_pretrained` reads the `quantization_config` that a
bitsandbytes, torchao or GPTQ folder carries in its `config.json` (the loading machine needs
that library too; `register` lists it in the model's requirements). An HQQ folder (`quant_method:
hqq`: hqq's own `qmodel.pt`, which transformers cannot load) loads through the `hqq` library; a
GPTQ folder on a machine without CUDA uses GPTQModel's torch kernel (its default CPU kernel
compiles itself for minutes on first use). These mirror `stages.common.lm.load_causal_lm`.

Input: a list of prompts, one prompt, or a DataFrame with a `prompt` column. Output: the greedy
continuation of each prompt (new tokens only, special tokens dropped), one string per prompt.
Param `max_new_tokens` (default: the `max_new_tokens` of the model config MLflow was given, else 32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd  # mlflow's own dependency: pyfunc hands predict a DataFrame

MODEL_ARTIFACT = "model"
DEFAULT_MAX_NEW_TOKENS = 32


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in whatever form pyfunc hands over: str, list, dict, or DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame (pyfunc's usual form)
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", model_input.get("prompts"))
        return prompts_of(value) if value is not None else []
    return [str(p) for p in model_input]


def load_model(folder: str) -> Any:
    """The causal LM in `folder`, quantized as its config says; on the GPU where there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    try:
        quant = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        quant = {}
    method = quant.get("quant_method")
    if method == "hqq":
        from hqq.models.hf.base import AutoHQQHFModel

        dtype = getattr(torch, quant.get("compute_dtype", "float32"))
        return AutoHQQHFModel.from_quantized(folder, compute_dtype=dtype, device="cuda" if cuda else "cpu")
    kwargs: dict[str, Any] = {}
    if method == "gptq":  # GPTQModel: as many CPU workers as cores, no C++ packing extension
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    if method == "gptq" and not cuda:
        from transformers import GPTQConfig

        kwargs["quantization_config"] = GPTQConfig(bits=quant["bits"], backend="torch")
    # On a GPU machine the weights go to the GPU (bitsandbytes needs it there to run fast).
    placement = {"device_map": "auto"} if cuda else {}
    return AutoModelForCausalLM.from_pretrained(folder, **placement, **kwargs)


class Generator(mlflow.pyfunc.PythonModel):
    """Greedy text continuation with the causal LM in the `model` artifact."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        folder = context.artifacts[MODEL_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(folder).eval()
        config = getattr(context, "model_config", None) or {}
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    # `pd.DataFrame` is the one hint MLflow builds no schema from: `register` gives the signature
    # (one string column, param max_new_tokens); called directly, predict takes lists and strings too.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        import torch
        from transformers import GenerationConfig

        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        device = next(self.model.parameters()).device
        stop = self.tokenizer.eos_token_id
        # The decoding of the pipeline's `lm.greedy` (which this file cannot import): greedy, stop
        # at EOS, special tokens dropped; `register` checks that both give the same text.
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                               pad_token_id=self.tokenizer.pad_token_id)
        out: list[str] = []
        # One prompt at a time: no padding, so an answer never depends on its batch-mates.
        for prompt in prompts_of(model_input):
            ids = torch.tensor([self.tokenizer(prompt)["input_ids"]], device=device)
            with torch.no_grad():
                seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            row = seq[0, ids.shape[1]:].tolist()
            out.append(self.tokenizer.decode(row[:row.index(stop)] if stop in row else row, skip_special_tokens=True))
        return out


mlflow.models.set_model(Generator())
