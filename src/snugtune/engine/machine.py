"""The machine a run trains on: holding a process to a smaller card's memory, and the facts for summary.json
(peak memory, device name, library versions)."""

from __future__ import annotations

import os

import torch

from snugtune.memory_rules import memory_cap_fraction
from snugtune.planner.cards import budget_bytes


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory reserved by torch on cuda; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    import importlib.metadata as md
    found = {}
    for name in ("snugtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def cap_memory(device: torch.device, budget: str) -> str | None:
    """Hold this process to the budget (a card's name or NGiB) on a bigger GPU, simulating the smaller card with
    torch.cuda.set_per_process_memory_fraction (memory_rules.memory_cap_fraction); returns a notice, or None
    when nothing was capped (budget: auto, not a GPU, or a GPU no bigger)."""
    if device.type != "cuda" or budget == "auto":
        return None
    size, _, card = budget_bytes(budget)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = memory_cap_fraction(size, total)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return f"memory capped at {size / 2**30:.1f} GiB ({card}) of this {total / 2**30:.0f} GiB GPU"
