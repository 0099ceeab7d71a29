"""Rows holding a whole conversation: OpenAI/TRL `messages` and ShareGPT `conversations` (turns as
{role, content} or {from, value})."""

from __future__ import annotations

from snugtune.data import turns
from snugtune.data.formats.fields import system_turns
from snugtune.data.rows import Row


def detect_messages(keys: dict) -> str | None:
    return "rows have a 'messages' list" if "messages" in keys else None


def detect_sharegpt(keys: dict) -> str | None:
    return "rows have a 'conversations' list" if "conversations" in keys else None


def _turns(row: Row, keys: dict, key: str) -> list[dict]:
    messages = turns.conversation(keys.get(key), row.where, key)
    return messages if messages[0]["role"] == "system" else system_turns(row, keys) + messages


def read_messages(row: Row, keys: dict) -> list[dict]:
    return _turns(row, keys, "messages")


def read_sharegpt(row: Row, keys: dict) -> list[dict]:
    return _turns(row, keys, "conversations")
