"""Instruction and preference records: Alpaca records, chat messages, preference pairs.

Each format is read from a JSONL file or a JSON array (`stages.readers.jsonl.read_lines`); the
row converters `instruction` and `preference` also serve the `hub` reader.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from stages.common.io import Drop
from stages.readers.base import Item, Source, native_id
from stages.readers.jsonl import read_lines


class AlpacaSource(Source):
    type: Literal["alpaca"]
    """Alpaca records: `instruction`, optional `input`, `output` (a JSON array or JSONL)."""


class ChatSource(Source):
    type: Literal["chat"]
    """JSONL of `{"messages": [{"role": ..., "content": ...}, ...]}` records."""
    messages_field: str = "messages"
    """Field holding the list of messages."""


class PairsSource(Source):
    type: Literal["pairs"]
    """JSONL of preference pairs: `prompt`, `chosen`, `rejected` (strings, or chat messages)."""


def as_messages(value: Any) -> list[dict[str, str]] | None:
    """Chat messages in the `[{"role", "content"}]` form, or None when they are not."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def alpaca_messages(obj: Any) -> list[dict[str, str]] | str:
    """Alpaca fields to chat messages, or the reason they cannot be."""
    if not isinstance(obj, dict):
        return "not_an_object"
    instruction, extra, output = obj.get("instruction"), obj.get("input") or "", obj.get("output")
    if not isinstance(instruction, str) or not isinstance(extra, str):
        return "wrong_type_instruction"
    if output is None:
        return "missing_output"
    if not isinstance(output, str):
        return "wrong_type_output"
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def instruction(obj: Any, where: str, messages_field: str | None) -> Item:
    """An instruction record from chat messages in `obj[messages_field]`, or from Alpaca fields
    when `messages_field` is None."""
    if messages_field is not None:
        messages = as_messages(obj.get(messages_field)) if isinstance(obj, dict) else None
        if messages is None:
            return Drop("malformed_messages", where)
    else:
        messages = alpaca_messages(obj)
        if isinstance(messages, str):
            return Drop(messages, where)
    return {"id": native_id(obj, "id"), "messages": messages}


def pair_text(value: Any) -> str | None:
    """A chosen/rejected answer as text: a string, or the last assistant turn of messages."""
    if isinstance(value, str):
        return value
    messages = as_messages(value)
    if messages:
        return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)
    return None


def preference(obj: Any, where: str) -> Item:
    """A preference record from `prompt` (text, or messages: the user's last turn; absent, TRL's
    implicit prompt: the user's last turn inside `chosen`), `chosen` and `rejected`. A pair that
    lacks a side is dropped as `missing_<side>`."""
    if not isinstance(obj, dict):
        return Drop("not_an_object", where)
    prompt = obj.get("prompt")
    if prompt is None:  # implicit prompt: chosen and rejected are whole conversations
        prompt = [m for m in as_messages(obj.get("chosen")) or [] if m["role"] != "assistant"] or None
    if isinstance(prompt, list):  # conversational prompt: the user's last turn
        msgs = as_messages(prompt) or []
        prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
    for side, value in (("prompt", prompt), ("chosen", obj.get("chosen")), ("rejected", obj.get("rejected"))):
        if value is None:  # absent or null
            return Drop(f"missing_{side}", where)
    chosen, rejected = pair_text(obj.get("chosen")), pair_text(obj.get("rejected"))
    if not isinstance(prompt, str) or chosen is None or rejected is None:
        return Drop("malformed_pair", where)
    return {"id": native_id(obj, "id"), "prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_alpaca(src: AlpacaSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        yield item if isinstance(item, Drop) else instruction(item[1], item[0], None)


def read_chat(src: ChatSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        yield item if isinstance(item, Drop) else instruction(item[1], item[0], src.messages_field)


def read_pairs(src: PairsSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        yield item if isinstance(item, Drop) else preference(item[1], item[0])
