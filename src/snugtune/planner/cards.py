"""Known GPU profiles: memory usable for a training process (GiB) and whether the card has bf16."""

from __future__ import annotations

import re

from snugtune.errors import ConfigError

GIB = 2**30

CARDS: dict[str, dict] = {
    "t4": {"usable_gib": 15.0, "bf16": False, "name": "Tesla T4 16 GB"},
    "rtx3080": {"usable_gib": 10.0, "bf16": True, "name": "RTX 3080 10 GB"},
    "rtx3090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 3090 24 GB"},
    "rtx4090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 4090 24 GB"},
    "l4": {"usable_gib": 22.0, "bf16": True, "name": "L4 24 GB"},
    "a10": {"usable_gib": 22.0, "bf16": True, "name": "A10 24 GB"},
    "a100-40": {"usable_gib": 39.5, "bf16": True, "name": "A100 40 GB"},
    "a100-80": {"usable_gib": 79.0, "bf16": True, "name": "A100 80 GB"},
    "h100": {"usable_gib": 79.0, "bf16": True, "name": "H100 80 GB"},
}


def budget_bytes(budget: str) -> tuple[int, bool, str]:
    """(usable bytes, bf16 available, description) for a card name or 'NGiB'. ConfigError if neither."""
    key = budget.strip().lower()
    if key in CARDS:
        card = CARDS[key]
        return int(card["usable_gib"] * GIB), card["bf16"], card["name"]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gi?b?", key)
    if match:
        return int(float(match.group(1)) * GIB), True, f"{match.group(1)} GiB"
    raise ConfigError(f"budget: '{budget}' is neither a card ({', '.join(CARDS)}) nor a size like 10GiB")
