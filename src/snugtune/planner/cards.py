"""Known GPU profiles: memory usable for a training process (GiB), whether the card has bf16 (compute
capability 8.0 and up, which also runs varlen flash attention: packed rows need no dense mask there), and
its datasheet dense 16-bit tensor rate (TFLOP/s, fp32 accumulate), which the step-time model scales."""

from __future__ import annotations

import re

from snugtune.errors import ConfigError

GIB = 2**30
MOST_GIB = 16384            # a budget given as a size: no card holds more (16 TiB)
DEFAULT_TFLOPS = 989.0  # a budget given as a size, or a card not listed: ranked as an H100

CARDS: dict[str, dict] = {
    "t4": {"usable_gib": 15.0, "bf16": False, "name": "Tesla T4 16 GB", "tflops": 65},
    "rtx3080": {"usable_gib": 10.0, "bf16": True, "name": "RTX 3080 10 GB", "tflops": 59.5},
    "rtx3090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 3090 24 GB", "tflops": 71},
    "rtx4090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 4090 24 GB", "tflops": 165},
    "l4": {"usable_gib": 22.0, "bf16": True, "name": "L4 24 GB", "tflops": 121},
    "a10": {"usable_gib": 22.0, "bf16": True, "name": "A10 24 GB", "tflops": 125},
    "a100-40": {"usable_gib": 39.5, "bf16": True, "name": "A100 40 GB", "tflops": 312},
    "a100-80": {"usable_gib": 79.0, "bf16": True, "name": "A100 80 GB", "tflops": 312},
    "h100": {"usable_gib": 79.0, "bf16": True, "name": "H100 80 GB", "tflops": 989},
}


def budget_bytes(budget: str) -> tuple[int, bool, str]:
    """(usable bytes, bf16 available, description) for a card name or 'NGiB'. ConfigError if neither."""
    key = budget.strip().lower()
    if key in CARDS:
        card = CARDS[key]
        return int(card["usable_gib"] * GIB), card["bf16"], card["name"]
    match = re.fullmatch(r"(\d{1,6}(?:\.\d{1,6})?)\s*gi?b?", key)
    if match and 0 < float(match.group(1)) <= MOST_GIB:
        return int(float(match.group(1)) * GIB), True, f"{match.group(1)} GiB"
    shown = budget if len(budget) <= 40 else f"{budget[:40]}... ({len(budget):,} characters)"
    raise ConfigError(f"budget: '{shown}' is neither a card ({', '.join(CARDS)}) nor a size like 10GiB "
                      f"(above 0, at most {MOST_GIB:,} GiB)")


def _profile(card: str) -> dict | None:
    """The CARDS entry of a card given by key or description; None for a size or an unlisted card."""
    key = card.strip().lower()
    return next((profile for name, profile in CARDS.items() if key in (name, profile["name"].lower())), None)


def has_varlen_attention(card: str) -> bool:
    """Whether `card` (key or description) runs varlen flash attention: compute capability 8.0 and up, as bf16;
    not for a card that is not known."""
    profile = _profile(card)
    return profile is not None and profile["bf16"]


def card_tflops(card: str) -> float:
    """Datasheet dense 16-bit TFLOP/s of a card given by key or description (DEFAULT_TFLOPS if unknown)."""
    profile = _profile(card)
    return profile["tflops"] if profile else DEFAULT_TFLOPS
