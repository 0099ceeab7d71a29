"""Prompt-completion rows (TRL): a prompt and its completion, each text or (TRL's conversational form) a
list of turns; also spelled problem/solution (MATH) or question/answer. As in TRL, only the completion is
trained: assistant turns inside the prompt are context."""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data import turns
from snugtune.data.formats.fields import system_turns, text_field
from snugtune.data.rows import Row

PAIRS = [("prompt", "completion"), ("problem", "solution"), ("question", "answer")]


def detect(keys: dict) -> str | None:
    return next((f"rows have '{p}' and '{c}'" for p, c in PAIRS if p in keys and c in keys), None)


def _side(row: Row, keys: dict, name: str, role: str) -> list[dict]:
    """A prompt or completion: text, or (TRL's conversational form) a list of messages."""
    if isinstance(keys.get(name), list):
        return turns.conversation(keys[name], row.where, name)
    return [{"role": role, "content": text_field(row, keys, name)}]


def read(row: Row, keys: dict) -> list[dict]:
    for p, c in PAIRS:
        if p in keys:
            prompt = turns.untrained(_side(row, keys, p, "user"))
            return system_turns(row, keys) + prompt + _side(row, keys, c, "assistant")
    raise ConfigError(f"{row.where}: missing field 'prompt' (or problem/question)")
