"""What the engine does to a prepared model to make its steps fast, decided once per run.

Each speedup leaves the numbers the same (within the compute dtype's rounding): LoRA layers run as one
autograd function each (engine.fused_lora); each transformer block is compiled with torch.compile,
which fuses the norms, rotary embedding, activation and residual adds between the matmuls; and each
micro-batch's forward and backward is replayed as a CUDA graph (engine.graphs), which removes the
per-kernel launch cost that bounds small-batch steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.config import Config
from snugtune.engine.fused_lora import fuse_lora_layers
from snugtune.models import blocks_draw_random_numbers

# reentrant checkpointing runs each block with and without grad, evaluation with its own shapes
_COMPILED_VARIANTS = 32


@dataclass(frozen=True)
class Speedups:
    """What was applied: LoRA layers fused, blocks compiled, micro-batches replayed as CUDA graphs."""
    fused_lora_layers: int
    compiled_blocks: int
    cuda_graphs: bool = False


def compile_wanted(config: Config, device: torch.device, distributed: bool, streaming: bool) -> bool:
    """train.compile resolved: auto compiles on a CUDA GPU, in one process, without offload (weight
    streaming's hooks swap the weights a compiled block would be specialised on; activation offload's
    saved-tensor hooks and MLP tiling's inner checkpoints are untested under compile)."""
    if config.train.compile != "auto":
        return bool(config.train.compile)
    return (device.type == "cuda" and not distributed and not streaming
            and config.offload.activations is not True and config.train.tiled_mlp is not True)


def cuda_graphs_wanted(model, config: Config, device: torch.device, distributed: bool, streaming: bool) -> bool:
    """train.cuda_graphs resolved: auto replays micro-batches as CUDA graphs where blocks are compiled, for
    LoRA methods (a frozen head: the loss needs no data-dependent shapes), without activation offload (its
    copies to host memory are made per step), and when no block draws random numbers (checkpointing cannot restore the generator in a graph).
    Asked for explicitly, it still needs a CUDA device, one process and a frozen head."""
    possible = (device.type == "cuda" and not distributed and not streaming and config.uses_lora
                and config.offload.activations is not True
                and config.train.tiled_mlp is not True
                and not blocks_draw_random_numbers(model, config))
    if config.train.cuda_graphs != "auto":
        return bool(config.train.cuda_graphs) and possible
    return possible and compile_wanted(config, device, distributed, streaming)


def dense_weights_kept_in(layers, config: Config, compiling: bool) -> tuple:
    """Blocks whose fused LoRA layers keep the dequantized weight from forward to backward: compiled,
    checkpointed blocks (recomputed one at a time: one block's dense weights extra at the peak), and only
    when nothing is offloaded (offload means memory is short; the planner models the same rule)."""
    offloaded = True in (config.offload.embeddings, config.offload.activations, config.offload.weights)
    if not compiling or offloaded:
        return ()
    return tuple(layer for layer in layers if getattr(layer, "gradient_checkpointing", False))


def apply_speedups(model, layers, config: Config, device: torch.device, distributed: bool = False,
                   streaming: bool = False, fsdp: bool = False) -> Speedups:
    """Fuse the LoRA layers (not under FSDP, whose unsharded weights are not bitsandbytes parameters) and
    compile the blocks when compile_wanted(). In place; returns what was done, and whether the training
    loop should replay micro-batches as CUDA graphs (cuda_graphs_wanted(); engine.graphs does it)."""
    compiling = compile_wanted(config, device, distributed, streaming)
    fused = fuse_lora_layers(model, dense_weights_kept_in(layers, config, compiling)) \
        if config.uses_lora and not fsdp else 0
    compiled = 0
    if compiling:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _COMPILED_VARIANTS)
        # a machine that cannot compile (no Triton for its GPU, no C compiler) logs it and runs the block eagerly
        torch._dynamo.config.suppress_errors = True
        for layer in layers:
            layer.compile()
            compiled += 1
    return Speedups(fused, compiled, cuda_graphs_wanted(model, config, device, distributed or fsdp, streaming))
