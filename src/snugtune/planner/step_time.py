"""Predicted time of one optimizer step, to rank the settings that fit and to say what the chosen split costs,
and the FLOPs behind it (also the bench's model FLOP utilisation).

Per micro-batch the GPU's time is its matrix arithmetic (FLOPs at a measured share of the card's datasheet
16-bit rate; attention kernels at their own share) plus its memory traffic where a kernel is bound by it
(dequantizing 4-bit weights, the low-rank and element-wise work around every adapted linear; bytes at a share
of the card's datasheet bandwidth). The CPU launching kernels (per block: far fewer when the step replays as
a CUDA graph) and host copies (offload, on their own stream) run beside it: the micro-batch takes the longest
of the three; offloaded activations coming back are the GPU's time, since backward copies each one on the
compute stream when it reaches it. Per step the optimizer, a pass over the trained parameters and their state.

FLOPs are split into the model's (what training the model needs: forward, input gradients, weight gradients of
what is trained, attention, and the forwards without gradient a preference objective's loss reads: DPO's
reference, KTO's) and the recomputation's (checkpointed blocks' second forward, the tiles' and
head groups' extra forwards, flash attention's recomputed scores in backward). Constants: docs/planner.md
("The step-time model"), fitted on every step time recorded in docs/runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from snugtune.memory_rules import forwards_without_gradient
from snugtune.methods import METHODS
from snugtune.planner.cards import card_bandwidth, card_tflops
from snugtune.planner.inventory import Inventory
from snugtune.planner.memory import (ON_HOST_WHEN_OFFLOADED, Breakdown, Part, attention_groups, checkpointed_blocks,
                                     in_mlp, trainable_params)
from snugtune.planner.plan import Decisions

MATMUL_EFFICIENCY = 0.75      # 16-bit matmuls' share of the datasheet rate (H200 step profiles: 630-750 TFLOP/s)
ATTENTION_EFFICIENCY = 0.55   # flash attention's share (H200 profile at 28,672 tokens: 575 forward, 490 backward)
MASKED_ATTENTION_EFFICIENCY = 0.25  # SDPA's memory-efficient kernel with a dense mask (sm75's path): not measured
MEMORY_EFFICIENCY = 0.90      # streaming kernels' share of the datasheet bandwidth
DEQUANTIZE_BYTES_PER_WEIGHT = 4.5   # nf4 read (0.5 + scales), 16-bit written, read again by the matmul
ACTIVATION_BYTES_PER_VALUE = 4.5    # per pass, per value of an adapted linear's input and output and of a
                                    # block's element-wise tensors (fitted, docs/planner.md)
BLOCK_KERNELS_S = 0.6e-3          # GPU time of a block's hundreds of small kernels (forward + backward) at
                                    # any size: each takes a few microseconds however little it does (fitted)
EAGER_LAUNCH_S_PER_BLOCK = 6.7e-3   # CPU time launching one compiled, recomputed block's forward, recompute and
                                    # backward, eager (TinyLlama 4 x 512, H100); a pass not recomputed: a quarter less
GRAPH_LAUNCH_S_PER_BLOCK = 0.3e-3   # ... replayed as a CUDA graph (the copies in and the replay call)
LAUNCH_STALL_SHARE = 0.05           # of the shorter of GPU work and launches, time the two do not overlap (the
                                    # GPU idles while a launch-heavy stretch catches up; H100, llama3-8b DPO
                                    # with 12 of 32 blocks recomputed: eager 0.278 s, replayed 0.247 s; fitted)
OPTIMIZER_BYTES_PER_PARAM = 100.0   # unscale, clip, 8-bit AdamW over one flat tensor: 1.2 ms for 42M on an H200
HOST_COPY_BYTES_S = 12e9            # pinned host <-> GPU copies (PCIe 4 x16 in practice)


@dataclass(frozen=True)
class Flops:
    """FLOPs of one micro-batch: matrix products and attention, each the model's and the recomputation's."""
    matmul: float
    attention: float
    matmul_recompute: float
    attention_recompute: float

    @property
    def model(self) -> float:
        return self.matmul + self.attention

    @property
    def recompute(self) -> float:
        return self.matmul_recompute + self.attention_recompute


def multiplying_params(inv: Inventory) -> int:
    """Parameters that multiply a token's activations: the blocks' linears and the output head (the input
    embeddings only look rows up; norms and biases scale and add)."""
    return inv.linear_params + inv.vocab * inv.hidden


def attention_forward_flops_per_token(inv: Inventory, s: Decisions) -> float:
    """One attention forward over the row, per token: scores and weighted values, 2 x 2 x q_dim x length per
    layer, half of it under a causal kernel; a dense mask (packed rows without varlen) computes every score."""
    share = 1.0 if s.attention_mask else 0.5
    return 4 * share * inv.layers * inv.q_dim * s.max_seq_len


def step_flops(inv: Inventory, s: Decisions) -> Flops:
    """FLOPs of one micro-batch (every sequence of its rows: a pair's two). Model: 2 forward + 2 input-gradient
    (+2 weight-gradient for trained weights) per multiplying parameter and token, LoRA's low-rank products
    likewise, attention (backward twice its forward), and each forward without gradient the objective runs
    (memory_rules.forwards_without_gradient). Recompute: one more forward of each checkpointed block, of each
    tiled MLP and of attention by groups of heads, and the scores flash attention recomputes in backward (half
    a forward)."""
    tokens = s.tokens
    n = multiplying_params(inv)
    method = METHODS[s.method]
    trained = {"all": n, "last_layers": trainable_params(inv, s)}.get(method.trains_base, 0)
    low_rank = trainable_params(inv, s) if method.adapters else 0  # r x (in + out) per adapted linear
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)
    block = inv.linear_params
    extra = forwards_without_gradient(s.objective, s.reference)
    matmul = tokens * (4 * n + 2 * trained + 6 * low_rank + extra * 2 * n)
    recompute = tokens * share * 2 * (block + low_rank)
    if s.tiled_mlp:  # each tile's MLP runs forward once more, in its own recomputation
        recompute += tokens * 2 * sum(l.in_features * l.out_features for l in inv.linears if in_mlp(inv, l))
    forward = tokens * attention_forward_flops_per_token(inv, s)
    regrouped = 1 if attention_groups(inv, s) > 1 else 0
    return Flops(matmul, (3 + extra) * forward, recompute, forward * (0.5 + share + regrouped))


def model_flops_per_token(inv: Inventory, s: Decisions) -> float:
    """The model's FLOPs per token (no recomputation): what model FLOP utilisation counts."""
    return step_flops(inv, s).model / s.tokens


def activation_values_per_token(inv: Inventory, s: Decisions) -> float:
    """Values a forward pass through the blocks reads or writes per token outside the big matmuls: every adapted
    linear's input and output (the low-rank products and their add), the norms, rotary and the MLP's
    activation (element-wise)."""
    low_rank = trainable_params(inv, s) / s.lora_r if METHODS[s.method].adapters else 0  # sum of in + out
    elementwise = inv.norms_per_block * 2 * inv.hidden + inv.q_dim + inv.kv_dim + 3 * inv.intermediate
    return low_rank + inv.layers * elementwise


def dequantize_bytes(inv: Inventory, s: Decisions) -> float:
    """Memory traffic of dequantizing the 4-bit block weights in one micro-batch: each forward (the objective's
    without gradient too), each recomputed forward, and backward unless a recomputed block kept its
    recomputation's (Decisions.dense_weights_kept; blocks not recomputed dequantize again in backward); none
    with a dense copy or a 16-bit base."""
    if METHODS[s.method].base_bits != 4 or s.dense_copy:
        return 0.0
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)
    extra = forwards_without_gradient(s.objective, s.reference)
    backward = 1 - share if s.dense_weights_kept else 1
    passes = 1 + extra + share + backward
    return passes * inv.linear_params * DEQUANTIZE_BYTES_PER_WEIGHT


def activation_bytes(inv: Inventory, s: Decisions) -> float:
    """Memory traffic of the activations' low-rank and element-wise passes in one micro-batch: forward (the
    objective's without gradient too), each recomputed forward, and backward (twice a forward's)."""
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)
    extra = forwards_without_gradient(s.objective, s.reference)
    return s.tokens * (3 + extra + share) * activation_values_per_token(inv, s) * ACTIVATION_BYTES_PER_VALUE


def memory_seconds(inv: Inventory, s: Decisions, card: str = "") -> float:
    """Time one micro-batch is bound by memory traffic, at a share of the card's bandwidth."""
    return (dequantize_bytes(inv, s) + activation_bytes(inv, s)) / (card_bandwidth(card) * MEMORY_EFFICIENCY)


def gpu_seconds(inv: Inventory, s: Decisions, card: str = "") -> float:
    """The GPU's time for one micro-batch: arithmetic, then memory traffic."""
    f = step_flops(inv, s)
    rate = card_tflops(card) * 1e12
    attention_share = MASKED_ATTENTION_EFFICIENCY if s.attention_mask else ATTENTION_EFFICIENCY
    arithmetic = (f.matmul + f.matmul_recompute) / (rate * MATMUL_EFFICIENCY) + \
        (f.attention + f.attention_recompute) / (rate * attention_share)
    return arithmetic + memory_seconds(inv, s, card) + inv.layers * BLOCK_KERNELS_S


def seconds_per_micro_batch(inv: Inventory, s: Decisions, parts: Breakdown, card: str = "") -> float:
    """The longest of the GPU's work, the CPU's launches and the host copies (each on its own stream), and the
    share of the launches the GPU waits for."""
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)
    per_block = GRAPH_LAUNCH_S_PER_BLOCK if s.cuda_graphs else EAGER_LAUNCH_S_PER_BLOCK
    extra = forwards_without_gradient(s.objective, s.reference)
    # forward, recompute, backward (twice a forward's), the objective's forwards without gradient
    launches = inv.layers * per_block * (3 + share + extra) / 4
    # beside the GPU's work: activations out, block weights in for forward and recompute (prefetched), the
    # embedding table's batch rows; in its way: activations back, each copied when backward reaches it
    offloaded = sum(parts.get(part, 0) for part in ON_HOST_WHEN_OFFLOADED.values())
    copies = (offloaded + 2 * parts.get(Part.HOST_BLOCK_WEIGHTS, 0)) / HOST_COPY_BYTES_S
    if s.embeddings_on_host:
        copies += s.tokens * inv.hidden * s.compute_bytes / HOST_COPY_BYTES_S
    gpu = gpu_seconds(inv, s, card) + offloaded / HOST_COPY_BYTES_S
    return max(gpu, launches, copies) + LAUNCH_STALL_SHARE * min(gpu, launches)


def optimizer_seconds(inv: Inventory, s: Decisions, card: str = "") -> float:
    """One optimizer step: unscale, clip and AdamW over the trained parameters, bound by memory traffic."""
    bytes_moved = OPTIMIZER_BYTES_PER_PARAM * trainable_params(inv, s)
    return bytes_moved / (card_bandwidth(card) * MEMORY_EFFICIENCY)


def seconds_per_step(inv: Inventory, s: Decisions, accum: int, parts: Breakdown, card: str = "") -> float:
    """Predicted seconds of one optimizer step of `accum` micro-batches."""
    return accum * seconds_per_micro_batch(inv, s, parts, card) + optimizer_seconds(inv, s, card)
