"""Reading one field of a row, shared by the format readers."""

from __future__ import annotations

from snugtune.errors import ConfigError
from snugtune.data.rows import Row


def text_field(row: Row, keys: dict, *names: str, required: bool = True) -> str | None:
    """The first of `names` the row has, as text; ConfigError naming the row when it is missing or not text."""
    for name in names:
        if keys.get(name) is not None:
            if not isinstance(keys[name], str):
                raise ConfigError(f"{row.where}: field '{name}' should be text, got {type(keys[name]).__name__}")
            return keys[name]
    if required:
        raise ConfigError(f"{row.where}: missing field '{names[0]}'")
    return None


def system_turns(row: Row, keys: dict) -> list[dict]:
    """The row's 'system' field as a system turn (none when it is absent or blank)."""
    system = text_field(row, keys, "system", required=False)
    return [{"role": "system", "content": system}] if system and system.strip() else []
