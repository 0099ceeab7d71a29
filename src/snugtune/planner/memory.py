"""Peak GPU memory of a snugtune training step, by component, from a model's inventory alone.

Activation and workspace terms follow what the engine keeps alive (see docs/planner.md for each term and
how it is derived). All sizes are bytes. A breakdown is keyed by Part; each Part carries its label, where
it lives (GPU or host memory) and when it is alive (the whole step, or one moment of it).
"""

from __future__ import annotations

from enum import Enum

from snugtune.memory_rules import (ATTENTION_GRAD_BYTES, CUDA_CONTEXT_BYTES, MIB, MLP_TILE_TOKENS, head_group_count,
                                   logits_chunk_tokens, norms_in_mlp_tiles)
from snugtune.methods import METHODS
from snugtune.planner.inventory import Inventory, Linear
from snugtune.planner.plan import Decisions

ALLOCATOR_FIXED = 280 * MIB       # reserved minus allocated, measured 0.15-0.69 GiB over the H100 grid of eager
                                  # blocks (2026-11-24), and kept for LLM.int8 layers, which allocate int8
                                  # copies and int32 products at every call; ...
ALLOCATOR_FIXED_COMPILED = 128 * MIB  # ... 0.02-0.29 GiB with compiled blocks of fused LoRA or plain linears,
                                      # whose forward and backward allocate a few large buffers each (2026-11-30
                                      # and 2026-12-06 grids)
ALLOCATOR_FRACTION = 0.015        # ... growing slowly with the allocated peak (expandable segments on)
ATTENTION_OUTPUT = "attention output"
# torch allocates a 32 MiB cuBLAS workspace per handle on Hopper (CublasHandlePool.cpp, 8 MiB on older cards;
# cuBLASLt shares it), and handles are per thread: the forward's and autograd's device thread's
CUBLAS_WORKSPACES = 2 * 32 * MIB
GRAPH_POOL_FRACTION = 1.2         # CUDA graphs' private pool reserves up to this share of the step's working
                                  # memory beyond it (no expandable segments there): Llama-3.1-8B 1x4096 on the
                                  # H100, 10.68 GiB reserved for 7.96 allocated (1.2), and the 16-bit LoRA rows
                                  # of the 2026-11-30 grid (1.1-1.3); other rows used less (0 to 0.9)
# a preference step's graph (DPO, ORPO), every micro-batch one shape, kept far less beyond its working memory,
# and no share of it that held across rows: 0.23-0.89 GiB on 10 rows of the H100 grid of 2026-12-07 (135M to 8B,
# 512 to 4,096 tokens, working memory 0.4 to 6 GiB: 7% to 127% of it), so a fixed reserve and a small share
# (fitted on those rows); where lengths vary, a shape not captured runs eagerly beside the pool: its working
# memory once more; where an epoch's last micro-batch holds fewer pairs, its share of it (the DPO TinyLlama recipe
# in the bench, 23 pairs in 2-pair micro-batches: 3.76 GiB reserved beyond 9.63 allocated, H100 2026-12-07)
PREFERENCE_GRAPH_POOL_FIXED = 512 * MIB
PREFERENCE_GRAPH_POOL_FRACTION = 0.05


class Part(Enum):
    """A row of the breakdown: (label, where: gpu | host, alive: step | forward | transient | overhead).
    'forward' rows are what the forward keeps until its backward; transients are alive at different moments
    of a step, each beside the forward rows ALIVE_BESIDE gives it: the peak is the largest such moment."""
    QUANTIZED_4BIT = ("quantized weights (4-bit + block scales)", "gpu", "step")
    QUANTIZED_8BIT = ("quantized weights (8-bit + row scales)", "gpu", "step")
    DENSE_COPY = ("16-bit copy of the 4-bit block weights", "gpu", "step")
    FROZEN_WEIGHTS = ("frozen 16-bit weights", "gpu", "step")
    TRAINED_WEIGHTS = ("trained weights (fp32 masters)", "gpu", "step")
    STREAMED_BLOCKS = ("streamed block weights (2 blocks at a time)", "gpu", "step")
    BLOCK_SCALES = ("4-bit block scales (all blocks)", "gpu", "step")
    HOST_BLOCK_WEIGHTS = ("frozen block weights (pinned)", "host", "step")
    KEPT_WEIGHTS = ("16-bit weights kept (embeddings, norms, lm_head)", "gpu", "step")
    HOST_EMBEDDING_TABLE = ("input embeddings (rows looked up there)", "host", "step")
    ADAPTER_PARAMS = ("LoRA parameters (fp32)", "gpu", "step")
    ADAPTER_GRADS = ("LoRA gradients (fp32)", "gpu", "step")
    TRAINED_GRADS = ("trained gradients (fp32)", "gpu", "step")
    OPTIMIZER_STATE = ("optimizer state", "gpu", "step")
    FSDP_GATHERED = ("FSDP gathered weights (root unit + 2 blocks)", "gpu", "step")
    CHECKPOINTED_INPUTS = ("checkpointed block inputs", "gpu", "forward")
    KEPT_ACTIVATIONS = ("activations (blocks not checkpointed)", "gpu", "forward")
    ALL_ACTIVATIONS = ("activations (blocks with gradients)", "gpu", "forward")
    HOST_CHECKPOINTED_INPUTS = ("checkpointed block inputs", "host", "step")
    HOST_KEPT_ACTIVATIONS = ("activations (blocks not checkpointed)", "host", "step")
    HOST_ALL_ACTIVATIONS = ("activations (blocks with gradients)", "host", "step")
    OFFLOADED_INPUT_BACK = ("one offloaded input copied back", "gpu", "forward")
    ATTENTION_MASK = ("attention mask (packed rows)", "gpu", "step")
    WORKSPACE = ("cuBLAS / dequantize / matmul workspace", "gpu", "step")
    RECOMPUTED_BLOCK = ("one block recomputed + its gradients", "gpu", "transient")
    BLOCK_GRADIENTS = ("one block's gradients", "gpu", "transient")
    LOSS = ("logits and loss (chunked)", "gpu", "transient")
    REFERENCE_COPY = ("frozen 16-bit copy of the base (the preference reference)", "gpu", "step")
    REFERENCE_PASS = ("forward without gradient (preference reference, KTO's mismatched rows)", "gpu", "transient")
    GRAPH_POOL = ("CUDA graphs' memory pool (reserved beyond use)", "gpu", "overhead")
    ALLOCATOR = ("allocator overhead and fragmentation", "gpu", "overhead")
    CUDA_CONTEXT = ("CUDA context", "gpu", "overhead")

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def on_host(self) -> bool:
        return self.value[1] == "host"

    @property
    def transient(self) -> bool:
        return self.value[2] == "transient"

    @property
    def overhead(self) -> bool:
        return self.value[2] == "overhead"

    @property
    def kept_for_backward(self) -> bool:
        return self.value[2] == "forward"


Breakdown = dict[Part, int]
WEIGHT_PARTS = (Part.QUANTIZED_4BIT, Part.QUANTIZED_8BIT, Part.FROZEN_WEIGHTS, Part.TRAINED_WEIGHTS)
SHARDED_PARTS = (*WEIGHT_PARTS, Part.KEPT_WEIGHTS, Part.ADAPTER_PARAMS, Part.ADAPTER_GRADS, Part.TRAINED_GRADS,
                 Part.OPTIMIZER_STATE)  # under FSDP each process keeps 1/N of these
# each transient, and the forward rows still alive beside it: the loss ends the forward; the top block's
# backward comes first; a checkpointed block is recomputed once the blocks above it, which kept their
# activations, are done; the reference pass (KTO's mismatched rows too) runs before the forward
ALIVE_BESIDE = {Part.LOSS: (Part.CHECKPOINTED_INPUTS, Part.KEPT_ACTIVATIONS, Part.ALL_ACTIVATIONS),
                Part.BLOCK_GRADIENTS: (Part.CHECKPOINTED_INPUTS, Part.KEPT_ACTIVATIONS, Part.ALL_ACTIVATIONS,
                                       Part.OFFLOADED_INPUT_BACK),
                Part.RECOMPUTED_BLOCK: (Part.CHECKPOINTED_INPUTS, Part.OFFLOADED_INPUT_BACK),
                Part.REFERENCE_PASS: ()}
ON_HOST_WHEN_OFFLOADED = {Part.CHECKPOINTED_INPUTS: Part.HOST_CHECKPOINTED_INPUTS,
                          Part.KEPT_ACTIVATIONS: Part.HOST_KEPT_ACTIVATIONS,
                          Part.ALL_ACTIVATIONS: Part.HOST_ALL_ACTIVATIONS}


def _adapted(inv: Inventory, s: Decisions) -> list[Linear]:
    first = inv.layers - s.lora_last_layers if s.lora_last_layers else 0
    return [l for l in inv.linears if l.short in s.lora_targets and l.layer >= first]


def trainable_params(inv: Inventory, s: Decisions) -> int:
    m = METHODS[s.method]
    if m.adapters:
        return sum(s.lora_r * (l.in_features + l.out_features) for l in _adapted(inv, s))
    if m.trains_base == "last_layers":
        first = inv.layers - s.trainable_layers  # the blocks' norms are a few thousand values: left out
        return sum(l.in_features * l.out_features for l in inv.linears if l.layer >= first)
    return inv.total_params


def weight_bytes(inv: Inventory, s: Decisions) -> Breakdown:
    """Base weights as stored on the GPU: quantized block linears, and the 16-bit rest."""
    n_lin = inv.linear_params
    m = METHODS[s.method]
    # nf4: 0.5 byte/param; absmax per 64-value block: fp32, or 8-bit + an fp32 per 256 blocks (double quant)
    stats = (n_lin / 64 * (1 + 4 / 256) if s.double_quant else n_lin / 64 * 4) if m.base_bits == 4 else 0
    if m.base_bits == 4:
        linear = {Part.QUANTIZED_4BIT: int(n_lin / 2 + stats)}
        if s.dense_copy:
            linear[Part.DENSE_COPY] = s.compute_bytes * n_lin
    elif m.base_bits == 8:
        rows = sum(l.out_features for l in inv.linears)
        linear = {Part.QUANTIZED_8BIT: int(n_lin + 4 * rows)}
    elif m.trains_base == "all":
        linear = {Part.TRAINED_WEIGHTS: 4 * n_lin}
    elif m.trains_base == "last_layers":
        trained = trainable_params(inv, s)
        linear = {Part.FROZEN_WEIGHTS: s.compute_bytes * (n_lin - trained), Part.TRAINED_WEIGHTS: 4 * trained}
    else:
        linear = {Part.FROZEN_WEIGHTS: s.compute_bytes * n_lin}
    other = 4 * inv.other_params if m.trains_base == "all" else s.compute_bytes * inv.other_params
    if s.embeddings_on_host:  # looked up in host memory; only the batch's rows reach the GPU
        other -= s.compute_bytes * inv.vocab * inv.hidden
    if s.stream_weights:  # frozen block weights live in host memory; the running block and the next on the GPU
        frozen = next(k for k in linear if k in (Part.QUANTIZED_4BIT, Part.QUANTIZED_8BIT, Part.FROZEN_WEIGHTS))
        data = linear.pop(frozen) - int(stats)
        linear[Part.STREAMED_BLOCKS] = 2 * data // inv.layers
        if stats:
            linear[Part.BLOCK_SCALES] = int(stats)
        linear[Part.HOST_BLOCK_WEIGHTS] = data
    kept = {**linear, Part.KEPT_WEIGHTS: other}
    if s.embeddings_on_host:
        kept[Part.HOST_EMBEDDING_TABLE] = s.compute_bytes * inv.vocab * inv.hidden
    return kept


def optimizer_bytes(inv: Inventory, s: Decisions) -> Breakdown:
    n = trainable_params(inv, s)
    state = 8 if s.optimizer == "adamw" else 2  # two fp32 moments, or two 8-bit moments
    if METHODS[s.method].adapters:  # LoRA masters (full/freeze counted as weights)
        return {Part.ADAPTER_PARAMS: 4 * n, Part.ADAPTER_GRADS: 4 * n, Part.OPTIMIZER_STATE: state * n}
    return {Part.TRAINED_GRADS: 4 * n, Part.OPTIMIZER_STATE: state * n}


# Tensors an activation function keeps for backward: torch's own kernels keep their input; the Python
# tanh formulas (gelu_new, gelu_fast) keep x, tanh(...), 0.5*x and 1+tanh(...).
ACTIVATION_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4,
                    "gelu_fast": 4}


def activation_bytes_per_token_layer(inv: Inventory, s: Decisions) -> int:
    """Bytes one transformer block keeps for backward, per token, when it is not checkpointed.

    What autograd saves on the GPU (bitsandbytes 4-bit layers keep no input, 8-bit layers do; RoPE keeps
    only cos/sin): each norm an fp32 copy of its input (lean norms, and compiled RMSNorm blocks: the 16-bit
    input) and its fp32 reciprocal deviation (LayerNorm: and mean); attention q, k and v (k, v repeated to
    all heads) and its output, an fp32 log-sum-exp per head and the packed rows' block-diagonal mask as a
    bias (by groups of heads: q, k and v unrepeated, nothing else) (seq bytes x 2 per token); the MLP the
    activation's saved tensors (compiled blocks: its input only, the rest recomputed in backward) and, gated,
    up and act(gate) (compiled: up). Each adapted linear: the autocast copy of its input for the fp32 LoRA A
    (fused layers in compiled blocks: the input itself, so o_proj's is attention's output), the dropout mask
    (1 byte), and the rank-r output. Under autocast LayerNorm runs in fp32 and bitsandbytes returns its
    input's dtype, so in quantized LayerNorm models (Phi, StableLM) the MLP's tensors are fp32.
    """
    c = s.compute_bytes
    a = _mlp_value_bytes(inv, s)
    norm_input = c if s.lean_norms or _compiled_rms(inv, s) else 4
    norms = inv.norms_per_block * (norm_input * inv.hidden + (8 if inv.layer_norm else 4))  # + fp32 rstd (mean)
    attention = 4 * c * inv.q_dim + 4 * inv.heads + (c * s.row_tokens if s.attention_mask else 0)
    if attention_groups(inv, s) > 1:  # attention._HeadGroupedAttention saves q, k and v, nothing else
        attention = c * (inv.q_dim + 2 * inv.kv_dim)
    mlp_input = 0 if inv.norms_per_block == 1 else inv.hidden  # parallel blocks share the attention's input
    inputs = 0
    m = METHODS[s.method]
    if m.linears_keep_input:  # LLM.int8 layers keep their input
        inputs = a * (inv.hidden + mlp_input + inv.intermediate) + c * inv.q_dim
    elif m.trains_base != "none":  # trained weights need their inputs, trained norms their output
        inputs = c * (inv.hidden + mlp_input + inv.intermediate + inv.q_dim) + c * inv.norms_per_block * inv.hidden
    # fused layers in compiled blocks keep the attention output itself for o_proj (traced on the CPU; eager
    # long-context rows on the GPU measured more than that count, so eager blocks count their own copy)
    shares_output = s.fused_lora and _compiled_rms(inv, s) and attention_groups(inv, s) == 1
    counted = (ATTENTION_OUTPUT,) if shares_output else ()
    lora = _lora_bytes_per_token(inv, s, lambda l: not in_mlp(inv, l), counted)
    return norms + attention + inputs + lora + mlp_bytes_per_token(inv, s)


def mlp_bytes_per_token(inv: Inventory, s: Decisions) -> int:
    """The part of activation_bytes_per_token_layer that the MLP keeps: its activation's and gate's tensors
    and, for its adapted linears, the LoRA inputs and rank-r outputs (what MLP tiling bounds)."""
    if _compiled_rms(inv, s):  # the activation's input and, gated, up; act(gate) is recomputed
        values = 2 if inv.gated_mlp else 1
    else:
        values = ACTIVATION_SAVES.get(inv.hidden_act, 4) + (2 if inv.gated_mlp else 0)
    lora = _lora_bytes_per_token(inv, s, lambda l: in_mlp(inv, l))
    return values * _mlp_value_bytes(inv, s) * inv.intermediate + lora


def _compiled_rms(inv: Inventory, s: Decisions) -> bool:
    """Compiled blocks of an RMSNorm model: inductor's partitioner saves a norm's 16-bit input and the
    activation's input and recomputes the pointwise work between them in backward (traced on the CPU,
    tests/planner/test_compiled_saves.py; the GPU rows agree, docs/planner.md). Counted as eager where not
    traced: LayerNorm models, MLP tiling (its tiles are checkpoints of their own) and LoRA dropout (the GPU
    row with it kept more than the eager count)."""
    return s.compiled_blocks and not s.tiled_mlp and not inv.layer_norm and s.lora_dropout == 0


def _mlp_value_bytes(inv: Inventory, s: Decisions) -> int:
    """Bytes of one MLP value: under autocast LayerNorm runs in fp32 and bitsandbytes returns its input's
    dtype, so quantized LayerNorm models keep fp32 MLP tensors."""
    return 4 if inv.layer_norm and METHODS[s.method].base_bits else s.compute_bytes


def in_mlp(inv: Inventory, linear: Linear) -> bool:
    return inv.intermediate in (linear.in_features, linear.out_features)


# linears that read one tensor: the block's normed input to attention or to the MLP, or attention's output
SHARED_INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp",
                 "up_proj": "mlp", "o_proj": ATTENTION_OUTPUT, "dense": ATTENTION_OUTPUT}


def _lora_bytes_per_token(inv: Inventory, s: Decisions, which, counted: tuple[str, ...] = ()) -> int:
    """Per token, for the adapted linears of one block that `which` selects: the input LoRA A multiplies
    (one tensor for the linears in SHARED_INPUTS that read the same one, where it is the same tensor: engine.
    fused_lora's layers, which redraw dropout in backward, or no dropout; none for the inputs in `counted`,
    kept by what produced them), the dropout mask (1 byte) and the rank-r output."""
    m = METHODS[s.method]
    if not m.adapters:
        return 0
    c, mask = s.compute_bytes, 1 if s.lora_dropout > 0 else 0
    fused = s.fused_lora
    top_block = [l for l in _adapted(inv, s) if l.layer == inv.layers - 1 and which(l)]  # every block alike
    inputs = {}
    for l in top_block:
        shared = SHARED_INPUTS.get(l.short) if fused or s.lora_dropout == 0 else None
        inputs[shared or l.short] = 0 if shared in counted else c * l.in_features
    return sum(inputs.values()) + sum(mask * l.in_features + c * s.lora_r for l in top_block)


def blocks_with_gradients(inv: Inventory, s: Decisions) -> int:
    """Blocks that backward passes through without checkpointing: from the first trained block to the
    top. Below it nothing requires grad, so autograd keeps no activations there (freeze, or LoRA on the
    last layers only)."""
    m = METHODS[s.method]
    if m.trains_base == "last_layers":
        return min(inv.layers, s.trainable_layers)
    if m.adapters:
        adapted = _adapted(inv, s)
        return inv.layers - min(l.layer for l in adapted) if adapted else 0
    return inv.layers


def checkpointed_blocks(inv: Inventory, s: Decisions) -> int:
    """Blocks that recompute their activations in backward (0 without checkpointing)."""
    if not s.grad_checkpointing:
        return 0
    return inv.layers if s.checkpointed_layers is None else min(inv.layers, s.checkpointed_layers)


def _activation_parts(inv: Inventory, s: Decisions) -> Breakdown:
    """What the forward keeps for backward, and the transient of backward's one block at a time."""
    tokens = s.tokens
    per_layer = activation_bytes_per_token_layer(inv, s) * tokens
    layers = blocks_with_gradients(inv, s)
    recomputed = checkpointed_blocks(inv, s)
    attention = attention_backward_bytes(inv, s)
    if not recomputed:
        return {Part.ALL_ACTIVATIONS: layers * per_layer, Part.BLOCK_GRADIENTS: per_layer + attention}
    # a checkpointed block keeps only its input and is recomputed in backward, one at a time, beside the
    # gradient flowing back; the engine makes the embeddings' output require grad for checkpointing, so
    # checkpointed blocks keep their input whether trained or not. Blocks above them keep everything.
    kept = min(inv.layers - recomputed, layers)
    recompute = per_layer + 2 * inv.hidden * s.compute_bytes * tokens + attention
    if s.lean_norms:  # the first norm keeps the block's input itself, counted as a checkpointed input (or copied back)
        recompute -= inv.hidden * s.compute_bytes * tokens
    if s.tiled_mlp:  # one tile's MLP tensors at a time, plus every tile's input kept for its recomputation
        mlp = mlp_bytes_per_token(inv, s)  # (with the norm inside the tiles, their input is what the norm kept)
        tile_inputs = 0 if norms_in_mlp_tiles(s.lean_norms, inv.model_type) else inv.hidden * s.compute_bytes * tokens
        recompute += mlp * (min(tokens, MLP_TILE_TOKENS) - tokens) + tile_inputs
    if s.dense_weights_kept and METHODS[s.method].base_bits == 4:
        per_block: dict[int, int] = {}
        for l in _adapted(inv, s):
            per_block[l.layer] = per_block.get(l.layer, 0) + l.in_features * l.out_features
        recompute += max(per_block.values(), default=0) * s.compute_bytes
    parts = {Part.CHECKPOINTED_INPUTS: recomputed * inv.hidden * s.compute_bytes * tokens,
             Part.RECOMPUTED_BLOCK: recompute}
    if kept:
        parts.update({Part.KEPT_ACTIVATIONS: kept * per_layer, Part.BLOCK_GRADIENTS: per_layer + attention})
    return parts


def attention_backward_bytes(inv: Inventory, s: Decisions) -> int:
    """The flash kernels' transient in attention's backward (memory_rules.ATTENTION_GRAD_BYTES per query
    value), one group's share when attention is tiled by heads."""
    return ATTENTION_GRAD_BYTES * inv.q_dim * s.tokens // attention_groups(inv, s)


def attention_groups(inv: Inventory, s: Decisions) -> int:
    """How many groups of heads attention's backward goes by (attention.head_groups' count)."""
    return head_group_count(inv.kv_dim // (inv.q_dim // inv.heads), s.head_groups)


def head_chunk_tokens(inv: Inventory, s: Decisions, scored: int) -> int:
    """Positions whose logits the output head holds at once: a chunk (memory_rules.logits_chunk_tokens) of the
    `scored` positions; a preference objective runs the head answer by answer (preference_loss.group_logps),
    and an answer has at most max_seq_len positions, unless its step is a CUDA graph (every position at once)."""
    most = scored if s.objective == "sft" or s.cuda_graphs else min(scored, s.max_seq_len)
    return min(logits_chunk_tokens(inv.vocab), most)


def _loss_bytes(inv: Inventory, s: Decisions) -> int:
    tokens = s.tokens
    # a step captured as a CUDA graph runs every position through the head (loss.token_loss_sum, fixed_shape)
    trained_tokens = tokens if s.trained_tokens is None or s.cuda_graphs else min(tokens, s.trained_tokens)
    chunk = head_chunk_tokens(inv, s, trained_tokens)
    # a preference loss gathers the scored rows of the hidden states once more, answer by answer (group_logps)
    copies = 1 if s.objective != "sft" else 0
    if METHODS[s.method].trains_base == "all":  # trained head: fp32 logits, log-softmax and their gradient; its
        # weight cast to 16 bits by autocast and that cast's gradient, before it joins the fp32 one
        return (chunk * inv.vocab * (s.compute_bytes + 4 + 4) + 2 * s.compute_bytes * inv.vocab * inv.hidden
                + trained_tokens * inv.hidden * (s.compute_bytes + 4 + copies * s.compute_bytes))
    # frozen head: fp32 logits become probabilities in place, + their 16-bit copy; the trained rows of the
    # hidden states and their gradient
    return chunk * inv.vocab * (4 + s.compute_bytes) + (2 + copies) * trained_tokens * inv.hidden * s.compute_bytes


def reference_bytes(inv: Inventory, s: Decisions) -> Breakdown:
    """A preference objective's reference: a frozen 16-bit copy of the base (reference 'copy'), and the
    forwards without gradient (the reference's, and KTO's mismatched rows' through the policy): one block's
    working set at a time over the micro-batch's tokens (its input and output, attention's q, k, v and
    output, the MLP's gate, up and activation), the final hidden states and one chunk of logits (fp32, and
    their log-softmax: loss.head_loss_sum without gradient)."""
    c, tokens = s.compute_bytes, s.tokens
    parts = {}
    if s.reference in ("adapter", "copy") or s.objective == "kto":  # precomputed: read from the batch
        block = tokens * (2 * inv.hidden + 2 * inv.q_dim + 2 * inv.kv_dim + 3 * inv.intermediate) * c
        head = tokens * inv.hidden * c + head_chunk_tokens(inv, s, tokens) * inv.vocab * (4 + 4)
        parts[Part.REFERENCE_PASS] = block + head
    if s.reference == "copy":
        parts[Part.REFERENCE_COPY] = c * inv.total_params
    return parts


def _held_parts(inv: Inventory, s: Decisions) -> Breakdown:
    """Weights, trained parameters, their gradients and optimizer state; under FSDP each process keeps
    1/N of each and gathers the root unit (embeddings, head, norms) and two blocks at a time whole."""
    weights = weight_bytes(inv, s)
    held = {**weights, **optimizer_bytes(inv, s)}
    if s.shards > 1:
        held = {k: v // s.shards for k, v in held.items()}
        block = sum(v for k, v in weights.items() if k in WEIGHT_PARTS)
        held[Part.FSDP_GATHERED] = weights[Part.KEPT_WEIGHTS] + 2 * block // inv.layers
    return held


def allocator_fixed(s: Decisions) -> int:
    """The part of the allocator's reserve beyond use that does not grow with the step."""
    few_buffers = s.compiled_blocks and not METHODS[s.method].linears_keep_input
    return ALLOCATOR_FIXED_COMPILED if few_buffers else ALLOCATOR_FIXED


def workspace_bytes(inv: Inventory, s: Decisions) -> int:
    """cuBLAS's workspaces; a 4-bit weight dequantized for its matmul (two for peft's layers); and, unless
    compiled blocks with fused LoRA layers fuse them away (their GPU rows measured none, docs/planner.md),
    the outputs eager ops allocate one by one beyond what is saved (the norms' fp32 temporaries, act(gate)
    and its product with up, peft's copies of its layers' outputs): two tokens x max(hidden, intermediate)."""
    c = s.compute_bytes
    biggest = max((l.in_features * l.out_features for l in inv.linears), default=0)
    if s.fused_lora and s.compiled_blocks and not s.tiled_mlp:
        return CUBLAS_WORKSPACES + (biggest * c if METHODS[s.method].base_bits == 4 and not s.dense_copy else 0)
    mlp_tokens = min(s.tokens, MLP_TILE_TOKENS) if s.tiled_mlp else s.tokens  # the MLP runs a tile at a time
    return CUBLAS_WORKSPACES + 2 * biggest * c + 2 * max(s.tokens * inv.hidden, mlp_tokens * inv.intermediate) * c


def graph_pool_bytes(s: Decisions, working: int) -> int:
    """What the CUDA graphs' private pool reserves beyond the step's working memory (`working`: the peak less
    what is held through the step)."""
    if s.objective == "sft":
        return int(GRAPH_POOL_FRACTION * working)
    beside = working if s.lengths_vary else s.tail_share * working
    return int(PREFERENCE_GRAPH_POOL_FIXED + PREFERENCE_GRAPH_POOL_FRACTION * working + beside)


def estimate(inv: Inventory, s: Decisions) -> Breakdown:
    """Peak memory breakdown (Part -> bytes) for one training step; see peak()."""
    tokens = s.tokens
    acts = _activation_parts(inv, s)
    if s.offload_activations:  # what the forward keeps waits in host memory; one block input comes back at a time
        acts = {ON_HOST_WHEN_OFFLOADED.get(k, k): v for k, v in acts.items()}
        acts[Part.OFFLOADED_INPUT_BACK] = inv.hidden * s.compute_bytes * tokens
    if s.attention_mask:
        acts[Part.ATTENTION_MASK] = s.micro_batch * s.row_tokens ** 2  # block-diagonal, 1 byte each
    parts = {**_held_parts(inv, s), **acts, Part.LOSS: _loss_bytes(inv, s),
             Part.WORKSPACE: workspace_bytes(inv, s), **reference_bytes(inv, s)}
    allocated = peak_allocated(parts)
    if s.cuda_graphs:  # the pool serves the step's activations, transients and workspace
        working = allocated - sum(v for k, v in _held_parts(inv, s).items() if not k.on_host)
        parts[Part.GRAPH_POOL] = graph_pool_bytes(s, working)
    # FSDP's all-gathered units come and go each step and leave about their size reserved beyond what is
    # allocated (2 x H200, Llama-3.1-8B QLoRA: 2.22 GiB reserved-allocated for 2.17 GiB gathered)
    parts[Part.ALLOCATOR] = int(allocator_fixed(s) + ALLOCATOR_FRACTION * allocated + parts.get(Part.FSDP_GATHERED, 0))
    parts[Part.CUDA_CONTEXT] = CUDA_CONTEXT_BYTES
    return {k: int(v) for k, v in parts.items() if v}


def _moment(parts: Breakdown, transient: Part) -> Breakdown:
    """The GPU rows of the step's moment where `transient` is alive: the forward rows alive beside it, and it."""
    return {k: v for k, v in parts.items() if k is transient or (k in ALIVE_BESIDE[transient] and not k.on_host)}


def largest_transient(parts: Breakdown) -> Part | None:
    """The transient whose moment of the step is the peak (the most bytes alive with it)."""
    transients = [k for k in parts if k.transient]
    return max(transients, key=lambda k: sum(_moment(parts, k).values())) if transients else None


def alive_at_peak(parts: Breakdown) -> Breakdown:
    """The GPU rows that make up the peak: everything held through the step and the overheads, and the peak
    moment's transient with the forward rows alive beside it. The other rows are alive at other moments,
    host rows not on the GPU at all."""
    top = largest_transient(parts)
    moment = _moment(parts, top) if top else {k: v for k, v in parts.items() if k.kept_for_backward}
    return {k: v for k, v in parts.items()
            if not k.on_host and (k in moment or not (k.transient or k.kept_for_backward))}


def peak_allocated(parts: Breakdown) -> int:
    """Bytes torch has allocated at the step's peak: everything persistent plus the largest transient."""
    return sum(v for k, v in alive_at_peak(parts).items() if not k.overhead)


def peak(parts: Breakdown) -> int:
    """Predicted peak GPU memory: allocated at the peak + graph pool + allocator overhead + CUDA context."""
    return sum(alive_at_peak(parts).values())


def host_bytes(parts: Breakdown) -> int:
    """Host (CPU) memory the offload policies hold, pinned."""
    return sum(v for k, v in parts.items() if k.on_host)
