"""Plain text rows: one document per row, every token trained (language modelling, code)."""

from __future__ import annotations

from snugtune.data.formats.fields import text_field
from snugtune.data.rows import Row

KEYS = ("text", "content", "code")


def detect(keys: dict) -> str | None:
    return "rows have a 'text' field" if "text" in keys else None


def read(row: Row, keys: dict) -> str:
    return text_field(row, keys, *KEYS)
