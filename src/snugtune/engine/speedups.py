"""What the engine does to a prepared model to make its steps fast, as the plan decided (planner.plan.Decisions).

Each speedup leaves the numbers the same (within the compute dtype's rounding): LoRA layers run as one
autograd function each (engine.fused_lora), multiplying by a dense copy of the 4-bit weights where the plan
holds one (engine.dense_copy); each transformer block is compiled with torch.compile,
which fuses the norms, rotary embedding, activation and residual adds between the matmuls; and each
micro-batch's forward and backward is replayed as a CUDA graph (engine.graphs), which removes the
per-kernel launch cost that bounds small-batch steps. Under torchrun every process applies the same ones
(memory_rules decides: fused layers and compiled blocks under DDP and FSDP, CUDA graphs in one process only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.engine.dense_copy import hold_dense_copies
from snugtune.engine.fused_lora import fuse_lora_layers
from snugtune.planner.plan import Decisions

# reentrant checkpointing runs each block with and without grad, evaluation with its own shapes
_COMPILED_VARIANTS = 32


@dataclass(frozen=True)
class Speedups:
    """What was applied: LoRA layers fused, blocks compiled, micro-batches replayed as CUDA graphs."""
    fused_lora_layers: int
    compiled_blocks: int
    cuda_graphs: bool = False
    dense_copy_bytes: int = 0   # the 16-bit copies of the 4-bit block weights (quant.dense_copy)


def apply_speedups(model, layers, decisions: Decisions, dtype: torch.dtype) -> Speedups:
    """What the plan decided, in place: dense copies of the 4-bit block weights (in the compute `dtype`), the
    LoRA layers fused (keeping the dequantized weight from forward to backward in recomputed blocks where the
    plan says so), each block compiled. Returns what was done; the training loop replays micro-batches as CUDA
    graphs where decisions.cuda_graphs (engine.graphs)."""
    copies = hold_dense_copies(layers, dtype) if decisions.dense_copy else {}
    kept = tuple(layer for layer in layers
                 if decisions.dense_weights_kept and getattr(layer, "gradient_checkpointing", False))
    fused = fuse_lora_layers(model, kept, copies) if decisions.fused_lora else 0
    compiled = compile_blocks(layers) if decisions.compiled_blocks else 0
    return Speedups(fused, compiled, decisions.cuda_graphs, sum(c.numel() * c.element_size() for c in copies.values()))


def compile_blocks(layers) -> int:
    """torch.compile each block, in place; returns how many."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _COMPILED_VARIANTS)
    # a machine that cannot compile (no Triton for its GPU, no C compiler) logs it and runs the block eagerly
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile()
    return len(layers)
