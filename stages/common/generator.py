"""The registered model: an MLflow pyfunc that loads a Hugging Face causal LM folder and answers
chats greedily.

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

Input: a list of rows, each a chat (a list of messages `{"role": ..., "content": ...}`) or a
string, taken as one user message:
`model.predict([[{"role": "user", "content": "Hi?"}], "Hi?"])`. A tokenizer with a chat template
renders each chat with it and the assistant's generation prompt, as `stages.common.lm.greedy`
does; one without (a base model) continues the string as raw text, and a chat joined as plain
`role: content` lines. Output: the greedy answer to each row (new tokens only, up to EOS, special
tokens dropped), one string per row. Param `max_new_tokens` (default: the signature's, else the
`max_new_tokens` of the model config MLflow was given, else 32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow

MODEL_ARTIFACT = "model"
DEFAULT_MAX_NEW_TOKENS = 32


def rows_of(model_input: Any) -> list[list[dict[str, str]] | str]:
    """The rows of the input, each a chat or a string; a ValueError names a row that is neither."""
    rows = [model_input] if isinstance(model_input, str) else list(model_input)
    for i, row in enumerate(rows):
        chat = isinstance(row, list) and bool(row) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in row)
        if not (isinstance(row, str) or chat):
            raise ValueError(f"input row {i} is {str(row)[:80]!r}: each row is a string or a non-empty list of "
                             'messages {"role": ..., "content": ...}')
    return rows


def prompt_ids(tokenizer: Any, row: list[dict[str, str]] | str) -> list[int]:
    """The token ids the model continues for `row`: the chat template's rendering with the
    assistant's generation prompt (a string is one user message), else the raw text."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": row}] if isinstance(row, str) else row
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    text = row if isinstance(row, str) else "\n".join(f"{m['role']}: {m['content']}" for m in row)
    return list(tokenizer(text)["input_ids"])


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
    """Greedy answers to chats with the causal LM in the `model` artifact."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        folder = context.artifacts[MODEL_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(folder).eval()
        config = getattr(context, "model_config", None) or {}
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    # A list hint makes pyfunc hand the rows over as they came (a DataFrame would split a chat into
    # columns); the element union is MLflow's "any", so `rows_of` checks each row itself. `register`
    # logs the params (max_new_tokens) through its input example.
    def predict(self, context: Any, model_input: list[list[dict[str, str]] | str],
                params: dict[str, Any] | None = None) -> list[str]:
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
        # One row at a time: no padding, so an answer never depends on its batch-mates.
        for row in rows_of(model_input):
            ids = torch.tensor([prompt_ids(self.tokenizer, row)], device=device)
            with torch.no_grad():
                seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            new = seq[0, ids.shape[1]:].tolist()
            out.append(self.tokenizer.decode(new[:new.index(stop)] if stop in new else new, skip_special_tokens=True))
        return out


mlflow.models.set_model(Generator())
