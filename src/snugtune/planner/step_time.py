"""Predicted time of one optimizer step, to rank the settings that fit and to say what the chosen split
costs: per micro-batch the GPU's arithmetic (FLOPs at a share of the card's datasheet rate) plus the
CPU's kernel launches (per block: far fewer when the step replays as a CUDA graph) plus host copies
(offload) plus dequantizing the 4-bit weights (none with a dense copy); per step the optimizer, by the
parameters it trains. Constants measured on an H100 (docs/benchmarks.md, TinyLlama 4 x 512: 0.193 s a
compiled eager step, 0.053 s replayed, 46 ms of it GPU work)."""

from __future__ import annotations

from snugtune.methods import METHODS
from snugtune.planner.cards import DEFAULT_TFLOPS, card_tflops
from snugtune.planner.inventory import Inventory
from snugtune.planner.memory import (Breakdown, Part, attention_groups, checkpointed_blocks, host_bytes, in_mlp,
                                     trainable_params)
from snugtune.planner.plan import Decisions

FLOPS_EFFICIENCY = 0.4        # sustained share of the datasheet rate (Llama-3.1-8B 1 x 2048 on an H100)
EAGER_LAUNCH_S_PER_BLOCK = 6.7e-3   # CPU time launching one compiled block's forward + backward, eager
GRAPH_LAUNCH_S_PER_BLOCK = 0.3e-3   # ... replayed as a CUDA graph (the copies in and the replay call)
OPTIMIZER_S_PER_PARAM = 1e-9        # unscale, clip, AdamW step (Llama-3.1-8B, 42M LoRA parameters: 32-49 ms)
HOST_COPY_BYTES_S = 12e9            # pinned host <-> GPU copies (PCIe 4 x16 in practice)
DEQUANTIZE_S_PER_WEIGHT = 1.17e-12  # one nf4 weight to 16 bits on an H200 (Llama-3.1-8B: 16.4 ms for two passes
                                    # over 7.0e9); scaled to other cards by their tensor rate


def step_flops(inv: Inventory, s: Decisions) -> float:
    """FLOPs of one micro-batch step: 2 forward + 2 input-gradient (+2 weight-gradient for trained weights)
    per parameter that multiplies (the input embeddings only look rows up) and token, + one more forward
    when checkpointing (and of the MLPs when tiled). Attention scores counted too (causal kernels skip
    the masked half; one more attention forward when its backward goes by groups of heads)."""
    tokens = s.micro_batch * s.max_seq_len
    n = inv.total_params - (0 if inv.tied_embeddings else inv.vocab * inv.hidden)
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)  # of the blocks, run forward twice
    per_token = (6 if METHODS[s.method].trains_base == "all" else 4) * n + 2 * n * share
    if s.tiled_mlp:  # each tile's MLP runs forward once more, in its own recomputation
        per_token += 2 * sum(l.in_features * l.out_features for l in inv.linears if in_mlp(inv, l))
    regrouped = 1 if attention_groups(inv, s) > 1 else 0
    attention = 2 * inv.layers * inv.q_dim * s.max_seq_len * (2 + share + regrouped)  # causal: half the scores
    return float(tokens * (per_token + attention))


def seconds_per_micro_batch(inv: Inventory, s: Decisions, parts: Breakdown, card: str = "") -> float:
    arithmetic = step_flops(inv, s) / (card_tflops(card) * 1e12 * FLOPS_EFFICIENCY)
    launches = inv.layers * (GRAPH_LAUNCH_S_PER_BLOCK if s.cuda_graphs else EAGER_LAUNCH_S_PER_BLOCK)
    # out and back (activations), forward and recompute (weights); of the embedding table only the batch's rows
    copied = host_bytes(parts) - parts.get(Part.HOST_EMBEDDING_TABLE, 0)
    copies = 2 * copied / HOST_COPY_BYTES_S
    if s.embeddings_on_host:
        copies += s.micro_batch * s.max_seq_len * inv.hidden * s.compute_bytes / HOST_COPY_BYTES_S
    return arithmetic + launches + copies + dequantize_seconds(inv, s, card)


def dequantize_seconds(inv: Inventory, s: Decisions, card: str = "") -> float:
    """Time one micro-batch spends dequantizing 4-bit block weights: each forward, each recomputed forward, and
    backward unless the block kept the forward's (memory.Decisions.dense_weights_kept); none with a dense copy."""
    if METHODS[s.method].base_bits != 4 or s.dense_copy:
        return 0.0
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)
    passes = 1 + share + (0 if s.dense_weights_kept else 1)
    return passes * inv.linear_params * DEQUANTIZE_S_PER_WEIGHT * DEFAULT_TFLOPS / card_tflops(card)


def seconds_per_step(inv: Inventory, s: Decisions, accum: int, parts: Breakdown, card: str = "") -> float:
    """Predicted seconds of one optimizer step of `accum` micro-batches."""
    return accum * seconds_per_micro_batch(inv, s, parts, card) + OPTIMIZER_S_PER_PARAM * trainable_params(inv, s)
