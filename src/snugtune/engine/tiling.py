"""Each block's MLP run over the sequence in tiles of MLP_TILE_TOKENS tokens, and its attention over groups
of heads, for long contexts.

At tens of thousands of tokens a recomputed block's peak is its MLP: gate, up and act(gate)·up are
tokens × intermediate each (Llama-3.1-8B at 48k tokens: 1.3 GiB apiece, ×2 again for their gradients).
The MLP treats tokens independently, so running it tile by tile (each tile checkpointed: only its input
is kept, its intermediates are recomputed in backward) holds one tile's intermediates at a time, for one
more MLP forward per step. Attention is not per token; its backward's transient is split by heads instead
(attention.head_groups: one group of heads differentiated at a time, for one more attention forward).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from snugtune.engine.lean_norm import lean_norms
from snugtune.memory_rules import ATTENTION_HEAD_GROUPS, MLP_TILE_TOKENS
from snugtune.planner.plan import Decisions


def _tiled(forward, tile_tokens: int):
    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= tile_tokens:
            return forward(x)
        tiles = rows.split(tile_tokens)
        if torch.is_grad_enabled():
            out = [checkpoint(forward, tile, use_reentrant=False) for tile in tiles]
        else:  # the first pass of a checkpointed block: nothing is kept, but the tile bounds the transient
            out = [forward(tile) for tile in tiles]
        return torch.cat(out).view(*x.shape[:-1], -1)
    return tiled_forward


def tile_mlps(layers, tile_tokens: int | None = None) -> int:
    """Run the MLP of every block in `layers` in checkpointed tiles of `tile_tokens` tokens (default
    MLP_TILE_TOKENS), in place. Returns how many MLPs were tiled."""
    tile_tokens = tile_tokens or MLP_TILE_TOKENS
    tiled = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and "forward" not in mlp.__dict__:
            mlp.forward = _tiled(mlp.forward, tile_tokens)
            tiled += 1
    return tiled


def tile_attention(layers, groups: int = ATTENTION_HEAD_GROUPS) -> int:
    """Attend over up to `groups` groups of heads in every block of `layers` (attention.attention reads
    `snugtune_head_groups`), in place. Returns how many attention modules were tiled."""
    tiled = 0
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            attention.snugtune_head_groups = groups
            tiled += 1
    return tiled


def tile_for_long_rows(model: torch.nn.Module, layers, decisions: Decisions) -> dict[str, int]:
    """The long-row memory policies the plan decided (memory_rules resolves them): MLP tiles, attention by groups
    of heads and lean norms, in place. Returns how many modules each changed."""
    return {
        "tiled_mlps": tile_mlps(layers) if decisions.tiled_mlp else 0,
        "grouped_attention": tile_attention(layers, decisions.head_groups) if decisions.head_groups > 1 else 0,
        "lean_norms": lean_norms(model) if decisions.lean_norms else 0,  # norms keep their 16-bit input
    }
