"""Guanaco rows: one `text` holding `### Human:` / `### Assistant:` turns (openassistant-guanaco)."""

from __future__ import annotations

import re

from snugtune.errors import ConfigError
from snugtune.data.formats.fields import text_field
from snugtune.data.rows import Row

_TURN = re.compile(r"###\s*(Human|Assistant):", re.IGNORECASE)


def detect(keys: dict) -> str | None:
    return "rows have 'text' with '### Human:' turns" if "### human:" in str(keys.get("text", "")).lower() else None


def read(row: Row, keys: dict) -> list[dict]:
    """`### Human:` / `### Assistant:` turns; text before the first marker is the system turn (context)."""
    parts = _TURN.split(text_field(row, keys, "text"))
    if len(parts) < 3:
        raise ConfigError(f"{row.where}: no '### Human:' / '### Assistant:' turns in 'text'")
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker.lower() == "human" else "assistant", "content": content.strip()})
    return messages
