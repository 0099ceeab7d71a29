"""Alpaca rows ({instruction, input, output}), with LLaMA-Factory's optional system and history."""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data.formats.fields import system_turns, text_field
from snugtune.data.rows import Row


def detect(keys: dict) -> str | None:
    return "rows have 'instruction' and 'output'" if "instruction" in keys and "output" in keys else None


def _text_pair(pair) -> bool:
    return isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)


def read(row: Row, keys: dict) -> list[dict]:
    """instruction + input -> the question, output -> the answer; LLaMA-Factory's system and history
    ([[question, answer], ...]) become the system turn and the earlier turns of the conversation."""
    instruction = text_field(row, keys, "instruction")
    extra = text_field(row, keys, "input", required=False) or ""
    history = keys.get("history") or []
    if not isinstance(history, list) or not all(_text_pair(pair) for pair in history):
        raise ConfigError(f"{row.where}: field 'history' should be a list of [question, answer] pairs")
    earlier = [{"role": role, "content": t} for pair in history for role, t in zip(("user", "assistant"), pair)]
    return system_turns(row, keys) + earlier + [
        {"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
        {"role": "assistant", "content": text_field(row, keys, "output")}]
