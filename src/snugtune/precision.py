"""Precision policy: which dtype the frozen base computes in, autocast, and fp16 loss scaling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from snugtune.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """bf16: autocast, no scaling. fp16: autocast + GradScaler (T4). fp32: plain (CPU default)."""
    name: str
    device_type: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"

    def autocast(self, cache_enabled: bool = True):
        """cache_enabled=False: no casts kept across calls (a CUDA graph must not reuse an earlier capture's)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype, cache_enabled=cache_enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.loss_scaling)


def resolve_device(requested: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu. ConfigError when cuda is asked for and absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible (set device: auto or cpu)")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_has_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32.
    The probes are torch's private functions: a torch without them gets fp32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 where the GPU supports it, fp16 where not (compute capability < 8); on a CPU bf16 where it
    multiplies bf16 natively, else fp32."""
    if device.type == "cpu":  # fp16 works on CPU (slowly): it lets the T4 loss-scaling path be tested anywhere
        if requested == "auto":
            requested = "bf16" if cpu_has_bf16() else "fp32"
        return Precision(requested, "cpu")
    if requested == "auto":
        requested = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError("train.precision: this GPU has no bf16; use fp16 (or auto)")
    return Precision(requested, "cuda")
