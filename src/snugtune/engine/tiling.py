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
from snugtune.memory_rules import ATTENTION_HEAD_GROUPS, MLP_NORMS, MLP_TILE_TOKENS, norms_in_mlp_tiles
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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _then(first, second):
    return lambda x: second(first(x))


def tile_mlps(layers, tile_tokens: int | None = None, norm_name: str | None = None) -> int:
    """Run the MLP of every block in `layers` in checkpointed tiles of `tile_tokens` tokens (default
    MLP_TILE_TOKENS), in place. With `norm_name` (memory_rules.MLP_NORMS: the block's norm whose output only
    the MLP reads) each tile also runs that norm, whose own forward becomes the identity: the tiles then keep
    slices of the norm's input, not a second full-length tensor, its output. The norm's weight stays where it
    is. Returns how many MLPs were tiled."""
    tile_tokens = tile_tokens or MLP_TILE_TOKENS
    tiled = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or "forward" in mlp.__dict__:
            continue
        forward = mlp.forward
        if norm_name:
            norm = getattr(layer, norm_name)
            forward = _then(norm.forward, forward)  # the lean forward, where norms are lean
            norm.forward = _identity
        mlp.forward = _tiled(forward, tile_tokens)
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
    """The long-row memory policies the plan decided (memory_rules resolves them): lean norms, MLP tiles (with
    the norm before each MLP inside them) and attention by groups of heads, in place. Returns how many modules
    each changed."""
    leaned = lean_norms(model) if decisions.lean_norms else 0  # norms keep their 16-bit input; first, so that
    # a norm run inside the MLP's tiles runs lean
    model_type = model.config.model_type
    norm_name = MLP_NORMS[model_type] if norms_in_mlp_tiles(decisions.lean_norms, model_type) else None
    return {
        "tiled_mlps": tile_mlps(layers, norm_name=norm_name) if decisions.tiled_mlp else 0,
        "grouped_attention": tile_attention(layers, decisions.head_groups) if decisions.head_groups > 1 else 0,
        "lean_norms": leaned,
    }
