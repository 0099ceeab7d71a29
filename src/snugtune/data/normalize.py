"""A raw row of a known format made one normalized sample, through the format registry.

A sample is {"messages": [...], "tools": [...] (optional)}, trained on its assistant turns, or {"text": str},
trained on every token. Bad rows raise ConfigError naming file:row and the field.
"""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data import turns
from snugtune.data.detect import plain_keys, refuse_kind
from snugtune.data.format_registry import DOCUMENT, FORMATS
from snugtune.data.rows import Row


def to_sample(row: Row, fmt: str, system_prompt: str | None = None) -> dict:
    """Normalize one raw row of format `fmt` (ConfigError naming the row and field if malformed or refused).
    system_prompt becomes the system turn of conversations that have none."""
    if not isinstance(row.value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(row.value).__name__}")
    refuse_kind(row)
    if fmt not in FORMATS:
        raise ConfigError(f"data.format: unknown format '{fmt}'")
    keys = plain_keys(row.value)
    body = FORMATS[fmt].read(row, keys)
    if FORMATS[fmt].produces == DOCUMENT:
        return {"text": body}
    messages = body
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    tools = turns.tools(keys.get("tools"), row.where)
    return {"messages": messages, **({"tools": tools} if tools else {})}


def blank_turn(sample: dict) -> bool:
    """A sample with nothing to answer: empty text, or an assistant turn with neither text nor a tool call
    (training it would teach the model to end its turn at once)."""
    if "text" in sample:
        return not sample["text"].strip()
    answers = [m for m in sample["messages"] if turns.trained(m)]
    return not answers or any(not m["content"].strip() and not m.get("tool_calls") for m in answers)
