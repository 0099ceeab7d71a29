"""What the engine does to a prepared model to make its steps fast, decided once per run.

Each speedup leaves the numbers the same (within the compute dtype's rounding): LoRA layers run as one
autograd function each (engine.fused_lora), multiplying by a dense copy of the 4-bit weights where the plan
holds one (engine.dense_copy); each transformer block is compiled with torch.compile,
which fuses the norms, rotary embedding, activation and residual adds between the matmuls; and each
micro-batch's forward and backward is replayed as a CUDA graph (engine.graphs), which removes the
per-kernel launch cost that bounds small-batch steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.config import Config
from snugtune.engine.dense_copy import hold_dense_copies
from snugtune.engine.fused_lora import fuse_lora_layers
from snugtune.memory_rules import compiles_blocks, holds_dense_copy, keeps_dense_weights, replays_cuda_graphs
from snugtune.methods import METHODS
from snugtune.models.load import blocks_draw_random_numbers

# reentrant checkpointing runs each block with and without grad, evaluation with its own shapes
_COMPILED_VARIANTS = 32


@dataclass(frozen=True)
class Speedups:
    """What was applied: LoRA layers fused, blocks compiled, micro-batches replayed as CUDA graphs."""
    fused_lora_layers: int
    compiled_blocks: int
    cuda_graphs: bool = False
    dense_copy_bytes: int = 0   # the 16-bit copies of the 4-bit block weights (quant.dense_copy)


def compile_wanted(config: Config, device: torch.device, distributed: bool, streaming: bool) -> bool:
    """train.compile resolved (memory_rules.compiles_blocks)."""
    return compiles_blocks(config.train.compile, device.type == "cuda", not distributed, streaming)


def cuda_graphs_wanted(model, config: Config, device: torch.device, distributed: bool, streaming: bool) -> bool:
    """train.cuda_graphs resolved (memory_rules.replays_cuda_graphs)."""
    return replays_cuda_graphs(config.train.cuda_graphs, compile_wanted(config, device, distributed, streaming),
                               device.type == "cuda", not distributed, streaming, METHODS[config.method].replays_graphs,
                               config.offload.activations is True, config.train.tiled_mlp is True,
                               blocks_draw_random_numbers(model, config))


def dense_copy_wanted(config: Config, streaming: bool, fsdp: bool) -> bool:
    """quant.dense_copy resolved (memory_rules.holds_dense_copy)."""
    return holds_dense_copy(config.quant.dense_copy is True, METHODS[config.method].base_bits == 4, fsdp, streaming)


def dense_weights_kept_in(layers, config: Config, compiling: bool, dense_copy: bool) -> tuple:
    """Blocks whose fused LoRA layers keep the dequantized weight from forward to backward
    (memory_rules.keeps_dense_weights)."""
    offloaded = True in (config.offload.embeddings, config.offload.activations, config.offload.weights)
    return tuple(layer for layer in layers if keeps_dense_weights(
        compiling, getattr(layer, "gradient_checkpointing", False), offloaded, dense_copy))


def apply_speedups(model, layers, config: Config, device: torch.device, dtype: torch.dtype,
                   distributed: bool = False, streaming: bool = False, fsdp: bool = False) -> Speedups:
    """Hold dense copies of the 4-bit block weights (in the compute `dtype`) when dense_copy_wanted(),
    fuse the LoRA layers (not under FSDP, whose unsharded weights are not bitsandbytes parameters) and
    compile the blocks when compile_wanted(). In place; returns what was done, and whether the training
    loop should replay micro-batches as CUDA graphs (cuda_graphs_wanted(); engine.graphs does it)."""
    compiling = compile_wanted(config, device, distributed, streaming)
    copying = dense_copy_wanted(config, streaming, fsdp)
    copies = hold_dense_copies(layers, dtype) if copying else {}
    kept = dense_weights_kept_in(layers, config, compiling, copying)
    fused = fuse_lora_layers(model, kept, copies) if config.uses_lora and not fsdp else 0
    compiled = 0
    if compiling:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _COMPILED_VARIANTS)
        # a machine that cannot compile (no Triton for its GPU, no C compiler) logs it and runs the block eagerly
        torch._dynamo.config.suppress_errors = True
        for layer in layers:
            layer.compile()
            compiled += 1
    return Speedups(fused, compiled, cuda_graphs_wanted(model, config, device, distributed or fsdp, streaming),
                    sum(c.numel() * c.element_size() for c in copies.values()))
