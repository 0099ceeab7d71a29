"""A raw row of a known format made one normalized sample, through the format registry.

A sample is {"messages": [...], "tools": [...] (optional)}, trained on its assistant turns (see turns.py), or
{"text": str}, trained on every token. Bad rows raise ConfigError naming file:row and the field.
"""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data import turns
from snugtune.data.detect import refuse_kind
from snugtune.data.format_registry import DOCUMENT, FORMATS
from snugtune.data.rows import Row, plain_keys


def to_sample(row: Row, fmt: str, system_prompt: str | None = None, reasoning: str = "train") -> dict:
    """Normalize one raw row of format `fmt` (ConfigError naming the row and field if malformed or refused).
    system_prompt becomes the system turn of conversations that have none; reasoning "drop" leaves the
    assistant turns' reasoning traces out."""
    if not isinstance(row.value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
    refuse_kind(row, fmt)
    if fmt not in FORMATS:
        raise ConfigError(f"data.format: unknown format '{fmt}'")
    keys = plain_keys(row.value)
    body = FORMATS[fmt].read(row, keys)
    if FORMATS[fmt].produces == DOCUMENT:
        return {"text": body}
    messages = body
    if reasoning == "drop":
        messages = without_reasoning(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    tools = turns.tools(keys.get("tools"), row.where)
    return {"messages": messages, **({"tools": tools} if tools else {})}


def without_reasoning(messages: list[dict]) -> list[dict]:
    """The turns without their reasoning traces (data.reasoning: drop)."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def without_blank_answers(sample: dict) -> tuple[dict, int]:
    """The sample without its blank answers, each removed with the user turns it answered, and how many
    were removed. (Training a blank answer would teach the model to end its turn at once; the rest of the
    conversation is still good.)"""
    if "text" in sample:
        return sample, 0
    kept, removed = [], 0
    for message in sample["messages"]:
        if turns.trained(message) and turns.blank(message):
            while kept and kept[-1]["role"] == "user":
                kept.pop()
            removed += 1
        else:
            kept.append(message)
    return {**sample, "messages": kept}, removed


def nothing_to_train(sample: dict, blank_answers: int) -> str | None:
    """Why the sample trains nothing (the drop reason that counts it), or None."""
    if "text" in sample:
        return "blank answer" if not sample["text"].strip() else None
    if any(turns.trained(m) for m in sample["messages"]):
        return None
    return "blank answer" if blank_answers else "no answer to train"
