"""Facts about the machine a run trained on, for summary.json: peak memory, device name, library versions."""

from __future__ import annotations

import os

import torch


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
