"""Known GPU profiles: memory usable for a training process (GiB), whether the card has bf16 (compute
capability 8.0 and up, which also runs varlen flash attention: packed rows need no dense mask there), its
datasheet dense 16-bit tensor rate (TFLOP/s, fp32 accumulate) and memory bandwidth (GB/s), which the
step-time model scales, and the pattern torch.cuda.get_device_name() of the card matches."""

from __future__ import annotations

import re

from snugtune.errors import ConfigError

GIB = 2**30
MOST_GIB = 16384            # a budget given as a size: no card holds more (16 TiB)
DEFAULT_TFLOPS = 989.0  # a budget given as a size, or a card not listed: ranked as an H100
DEFAULT_GBPS = 3350.0

CARDS: dict[str, dict] = {
    "t4": {"usable_gib": 15.0, "bf16": False, "name": "Tesla T4 16 GB", "tflops": 65, "gbps": 320,
           "device": r"\bT4\b"},
    "rtx3080": {"usable_gib": 10.0, "bf16": True, "name": "RTX 3080 10 GB", "tflops": 59.5, "gbps": 760,
                "device": r"RTX 3080\b"},
    "rtx3090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 3090 24 GB", "tflops": 71, "gbps": 936,
                "device": r"RTX 3090\b"},
    "rtx4090": {"usable_gib": 24.0, "bf16": True, "name": "RTX 4090 24 GB", "tflops": 165, "gbps": 1008,
                "device": r"RTX 4090\b"},
    "l4": {"usable_gib": 22.0, "bf16": True, "name": "L4 24 GB", "tflops": 121, "gbps": 300, "device": r"\bL4\b"},
    "a10": {"usable_gib": 22.0, "bf16": True, "name": "A10 24 GB", "tflops": 125, "gbps": 600, "device": r"\bA10\b"},
    "a100-40": {"usable_gib": 39.5, "bf16": True, "name": "A100 40 GB", "tflops": 312, "gbps": 1555,
                "device": r"A100.*40GB"},
    "a100-80": {"usable_gib": 79.0, "bf16": True, "name": "A100 80 GB", "tflops": 312, "gbps": 2039,
                "device": r"A100.*80GB"},
    "h100": {"usable_gib": 79.0, "bf16": True, "name": "H100 80 GB", "tflops": 989, "gbps": 3350,
             "device": r"H100"},
    "h200": {"usable_gib": 139.0, "bf16": True, "name": "H200 141 GB", "tflops": 989, "gbps": 4800,
             "device": r"H200"},
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
    """The CARDS entry of a card given by key, description or torch's device name (NVIDIA H100 80GB HBM3);
    None for a size or an unlisted card."""
    key = card.strip().lower()
    named = next((profile for name, profile in CARDS.items() if key in (name, profile["name"].lower())), None)
    return named or next((profile for profile in CARDS.values() if re.search(profile["device"], card)), None)


def has_varlen_attention(card: str) -> bool:
    """Whether `card` (key or description) runs varlen flash attention: compute capability 8.0 and up, as bf16;
    not for a card that is not known."""
    profile = _profile(card)
    return profile is not None and profile["bf16"]


def card_tflops(card: str, default: float | None = DEFAULT_TFLOPS) -> float | None:
    """Datasheet dense 16-bit TFLOP/s of a card given by key, description or device name (`default` if
    unknown)."""
    profile = _profile(card)
    return profile["tflops"] if profile else default


def card_bandwidth(card: str) -> float:
    """Datasheet memory bandwidth in bytes/s of a card given by key, description or device name (an H100's if
    unknown)."""
    profile = _profile(card)
    return (profile["gbps"] if profile else DEFAULT_GBPS) * 1e9
