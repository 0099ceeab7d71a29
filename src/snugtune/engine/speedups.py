"""What the engine does to a prepared model to make its steps fast, decided once per run.

Each speedup leaves the numbers the same (within the compute dtype's rounding): LoRA layers run as one
autograd function each (engine.fused_lora), and each transformer block is compiled with torch.compile,
which fuses the norms, rotary embedding, activation and residual adds between the matmuls and removes
most of the per-operation launch cost that bounds small-batch steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.config import Config
from snugtune.engine.fused_lora import fuse_lora_layers

# reentrant checkpointing runs each block with and without grad, evaluation with its own shapes
_COMPILED_VARIANTS = 32


@dataclass(frozen=True)
class Speedups:
    """What was applied: LoRA layers fused, blocks compiled."""
    fused_lora_layers: int
    compiled_blocks: int


def compile_wanted(config: Config, device: torch.device, distributed: bool, streaming: bool) -> bool:
    """train.compile resolved: auto compiles on a CUDA GPU, in one process, without offload (weight
    streaming's hooks swap the weights a compiled block would be specialised on; activation offload's
    saved-tensor hooks and MLP tiling's inner checkpoints are untested under compile)."""
    if config.train.compile != "auto":
        return bool(config.train.compile)
    return (device.type == "cuda" and not distributed and not streaming
            and config.offload.activations is not True and config.train.tiled_mlp is not True)


def apply_speedups(model, layers, config: Config, device: torch.device, distributed: bool = False,
                   streaming: bool = False, fsdp: bool = False) -> Speedups:
    """Fuse the LoRA layers (not under FSDP, whose unsharded weights are not bitsandbytes parameters) and
    compile the blocks when compile_wanted(). In place; returns what was done."""
    fused = fuse_lora_layers(model) if config.uses_lora and not fsdp else 0
    compiled = 0
    if compile_wanted(config, device, distributed, streaming):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _COMPILED_VARIANTS)
        # a machine that cannot compile (no Triton for its GPU, no C compiler) logs it and runs the block eagerly
        torch._dynamo.config.suppress_errors = True
        for layer in layers:
            layer.compile()
            compiled += 1
    return Speedups(fused, compiled)
