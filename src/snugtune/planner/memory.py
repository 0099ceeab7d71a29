"""Peak GPU memory of a snugtune training step, by component, from a model's config alone.

The model is instantiated on the meta device (no memory, any architecture transformers knows), so the
parameter inventory is exact; activation and workspace terms follow what the engine keeps alive
(see docs/planner.md for each term and how it is derived). All sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snugtune.methods import METHODS

MIB = 2**20
CUDA_CONTEXT = 685 * MIB          # driver + cuBLAS handles, outside torch's allocator (measured: H100, CUDA 13)
ALLOCATOR_FIXED = 280 * MIB       # reserved minus allocated, measured 0.25-0.43 GiB over the H100 grid
ALLOCATOR_FRACTION = 0.015        # ... growing slowly with the allocated peak (expandable segments on)
LOSS_CHUNK_BYTES = 128 * MIB      # loss.py: fp32 logits held at once
MLP_TILE_TOKENS = 8192            # engine/tiling.py: tokens an MLP tile holds intermediates for


@dataclass(frozen=True)
class Linear:
    name: str          # e.g. model.layers.3.self_attn.q_proj
    short: str         # q_proj
    in_features: int
    out_features: int
    layer: int         # block index


@dataclass
class Inventory:
    """What memory depends on in a model: its block linears and everything else, counted exactly."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    q_dim: int
    kv_dim: int
    heads: int
    linears: list[Linear] = field(default_factory=list)
    other_params: int = 0          # embeddings, norms, biases, lm_head (16-bit in every method)
    tied_embeddings: bool = False
    norms_per_block: int = 2       # 1 where attention and MLP read the same normed input (Phi)
    layer_norm: bool = False       # LayerNorm (Phi, StableLM) rather than RMSNorm
    gated_mlp: bool = True         # gate/up/down (SwiGLU) rather than fc1/fc2
    hidden_act: str = "silu"

    @property
    def linear_params(self) -> int:
        return sum(l.in_features * l.out_features for l in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


def inventory_from_config(config) -> Inventory:
    """Build the model on the meta device and list its parameters."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = model.model.layers
    linears, in_blocks = [], set()
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                linears.append(Linear(f"model.layers.{i}.{name}", name.rsplit(".", 1)[-1], module.in_features,
                                      module.out_features, i))
                in_blocks.add(id(module.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    norms = [m for m in blocks[0].modules() if "norm" in type(m).__name__.lower()]
    shorts = {l.short for l in linears}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Inventory(config.model_type, config.hidden_size, config.intermediate_size, len(blocks),
                     config.vocab_size, heads * head_dim, kv * head_dim, heads, linears, other,
                     bool(getattr(config, "tie_word_embeddings", False)), len(norms),
                     any(isinstance(m, torch.nn.LayerNorm) for m in norms), "gate_proj" in shorts,
                     getattr(config, "hidden_act", "silu"))


@dataclass(frozen=True)
class Settings:
    """Everything the estimate depends on besides the model."""
    method: str                  # lora | qlora | lora-8bit | freeze | full
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_last_layers: int | None
    double_quant: bool
    optimizer: str               # adamw | adamw_8bit | paged_adamw_8bit
    compute_bytes: int           # 2 for bf16/fp16, 4 for fp32
    micro_batch: int
    max_seq_len: int
    grad_checkpointing: bool
    trainable_layers: int = 2    # method=freeze
    checkpointed_layers: int | None = None  # with checkpointing: blocks (from the first) that recompute; None = all
    lora_dropout: float = 0.0
    trained_tokens: int | None = None  # most trained positions in one micro-batch, from the data; None: all
    offload_activations: bool = False  # engine.offload.ActivationOffload
    stream_weights: bool = False       # engine.offload.WeightStreamer (frozen block weights in host memory)
    shards: int = 1                    # FSDP processes the weights are sharded over (1: not sharded)
    attention_mask: bool = True        # batches carry a mask (several packed samples a row, or padding);
                                       # rows of one sample each run plain causal attention, no mask
    tiled_mlp: bool = False            # engine.tiling: each MLP over the sequence in checkpointed tiles
    embeddings_on_host: bool = False   # engine.offload.HostEmbedding: the frozen input table in host memory
    dense_weights_kept: bool = False   # engine.speedups.dense_weights_kept_in: a compiled, recomputed 4-bit block
                                       # keeps its LoRA layers' dequantized weights until its backward


HOST = "host: "  # breakdown keys of host (CPU) memory: not part of the GPU peak
EMBEDDING_TABLE = "input embeddings (rows looked up there)"  # host memory that is not copied each step


def _adapted(inv: Inventory, s: Settings) -> list[Linear]:
    first = inv.layers - s.lora_last_layers if s.lora_last_layers else 0
    return [l for l in inv.linears if l.short in s.lora_targets and l.layer >= first]


def trainable_params(inv: Inventory, s: Settings) -> int:
    m = METHODS[s.method]
    if m.adapters:
        return sum(s.lora_r * (l.in_features + l.out_features) for l in _adapted(inv, s))
    if m.trains_base == "last_layers":
        first = inv.layers - s.trainable_layers  # the blocks' norms are a few thousand values: left out
        return sum(l.in_features * l.out_features for l in inv.linears if l.layer >= first)
    return inv.total_params


def weight_bytes(inv: Inventory, s: Settings) -> dict[str, int]:
    """Base weights as stored on the GPU: quantized block linears, and the 16-bit rest."""
    n_lin = inv.linear_params
    m = METHODS[s.method]
    # nf4: 0.5 byte/param; absmax per 64-value block: fp32, or 8-bit + an fp32 per 256 blocks (double quant)
    stats = (n_lin / 64 * (1 + 4 / 256) if s.double_quant else n_lin / 64 * 4) if m.base_bits == 4 else 0
    if m.base_bits == 4:
        linear = {"quantized weights (4-bit + block scales)": int(n_lin / 2 + stats)}
    elif m.base_bits == 8:
        rows = sum(l.out_features for l in inv.linears)
        linear = {"quantized weights (8-bit + row scales)": int(n_lin + 4 * rows)}
    elif m.trains_base == "all":
        linear = {"trained weights (fp32 masters)": 4 * n_lin}
    elif m.trains_base == "last_layers":
        trained = trainable_params(inv, s)
        linear = {"frozen 16-bit weights": s.compute_bytes * (n_lin - trained),
                  "trained weights (fp32 masters)": 4 * trained}
    else:
        linear = {"frozen 16-bit weights": s.compute_bytes * n_lin}
    other = 4 * inv.other_params if m.trains_base == "all" else s.compute_bytes * inv.other_params
    if s.embeddings_on_host:  # looked up in host memory; only the batch's rows reach the GPU
        other -= s.compute_bytes * inv.vocab * inv.hidden
    if s.stream_weights:  # frozen block weights live in host memory; the running block and the next on the GPU
        frozen = next(k for k in linear if k.startswith(("quantized", "frozen")))
        data = linear.pop(frozen) - int(stats)
        linear[f"streamed block weights (2 of {inv.layers} blocks)"] = 2 * data // inv.layers
        if stats:
            linear["4-bit block scales (all blocks)"] = int(stats)
        linear[HOST + "frozen block weights (pinned)"] = data
    kept = {**linear, "16-bit weights kept (embeddings, norms, lm_head)": other}
    if s.embeddings_on_host:
        kept[HOST + EMBEDDING_TABLE] = s.compute_bytes * inv.vocab * inv.hidden
    return kept


def optimizer_bytes(inv: Inventory, s: Settings) -> dict[str, int]:
    n = trainable_params(inv, s)
    state = 8 if s.optimizer == "adamw" else 2  # two fp32 moments, or two 8-bit moments
    label = "LoRA" if METHODS[s.method].adapters else "trained"
    extra = 4 * n if METHODS[s.method].adapters else 0  # LoRA masters (full/freeze counted as weights)
    return {f"{label} parameters (fp32)": extra, f"{label} gradients (fp32)": 4 * n,
            f"optimizer state ({s.optimizer})": state * n}


# Tensors an activation function keeps for backward: torch's own kernels keep their input; the Python
# tanh formulas (gelu_new, gelu_fast) keep x, tanh(...), 0.5*x and 1+tanh(...).
ACTIVATION_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4,
                    "gelu_fast": 4}


def activation_bytes_per_token_layer(inv: Inventory, s: Settings) -> int:
    """Bytes one transformer block keeps for backward, per token, when it is not checkpointed.

    What autograd saves on the GPU (bitsandbytes 4-bit layers keep no input, 8-bit layers do; RoPE keeps
    only cos/sin): each norm an fp32 copy of its input; attention q, k and v (k, v repeated to all heads)
    and its output, an fp32 log-sum-exp per head and the packed rows' block-diagonal mask as a bias
    (seq bytes x 2 per token); the MLP the activation's saved tensors and, gated, up and act(gate). Each
    adapted linear: the autocast copy of its input for the fp32 LoRA A, the dropout mask (1 byte), and the
    rank-r output. Under autocast LayerNorm runs in fp32 and bitsandbytes returns its input's dtype, so in
    quantized LayerNorm models (Phi, StableLM) the MLP's tensors are fp32.
    """
    c = s.compute_bytes
    a = _mlp_value_bytes(inv, s)
    norms = inv.norms_per_block * 4 * inv.hidden
    attention = 4 * c * inv.q_dim + 4 * inv.heads + (c * s.max_seq_len if s.attention_mask else 0)
    mlp_input = 0 if inv.norms_per_block == 1 else inv.hidden  # parallel blocks share the attention's input
    inputs = 0
    m = METHODS[s.method]
    if m.linears_keep_input:  # LLM.int8 layers keep their input
        inputs = a * (inv.hidden + mlp_input + inv.intermediate) + c * inv.q_dim
    elif m.trains_base != "none":  # trained weights need their inputs, trained norms their output
        inputs = c * (inv.hidden + mlp_input + inv.intermediate + inv.q_dim) + c * inv.norms_per_block * inv.hidden
    lora = _lora_bytes_per_token(inv, s, lambda l: not _in_mlp(inv, l))
    return norms + attention + inputs + lora + mlp_bytes_per_token(inv, s)


def mlp_bytes_per_token(inv: Inventory, s: Settings) -> int:
    """The part of activation_bytes_per_token_layer that the MLP keeps: its activation's and gate's tensors
    and, for its adapted linears, the LoRA inputs and rank-r outputs (what MLP tiling bounds)."""
    mlp = (ACTIVATION_SAVES.get(inv.hidden_act, 4) + (2 if inv.gated_mlp else 0)) * _mlp_value_bytes(inv, s)
    return mlp * inv.intermediate + _lora_bytes_per_token(inv, s, lambda l: _in_mlp(inv, l))


def _mlp_value_bytes(inv: Inventory, s: Settings) -> int:
    """Bytes of one MLP value: under autocast LayerNorm runs in fp32 and bitsandbytes returns its input's
    dtype, so quantized LayerNorm models keep fp32 MLP tensors."""
    return 4 if inv.layer_norm and METHODS[s.method].base_bits else s.compute_bytes


def _in_mlp(inv: Inventory, linear: Linear) -> bool:
    return inv.intermediate in (linear.in_features, linear.out_features)


def _lora_bytes_per_token(inv: Inventory, s: Settings, which) -> int:
    """Per token, for the adapted linears of one block that `which` selects: the autocast copy of the input
    for the fp32 LoRA A, the dropout mask (1 byte) and the rank-r output."""
    if not METHODS[s.method].adapters:
        return 0
    c, mask = s.compute_bytes, 1 if s.lora_dropout > 0 else 0
    top_block = [l for l in _adapted(inv, s) if l.layer == inv.layers - 1 and which(l)]  # every block alike
    return sum((c + mask) * l.in_features + c * s.lora_r for l in top_block)


def blocks_with_gradients(inv: Inventory, s: Settings) -> int:
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


def checkpointed_blocks(inv: Inventory, s: Settings) -> int:
    """Blocks that recompute their activations in backward (0 without checkpointing)."""
    if not s.grad_checkpointing:
        return 0
    return inv.layers if s.checkpointed_layers is None else min(inv.layers, s.checkpointed_layers)


def estimate(inv: Inventory, s: Settings) -> dict[str, int]:
    """Peak memory breakdown (component -> bytes) for one training step; see peak()."""
    tokens = s.micro_batch * s.max_seq_len
    per_layer = activation_bytes_per_token_layer(inv, s) * tokens
    layers = blocks_with_gradients(inv, s)
    recomputed = checkpointed_blocks(inv, s)
    if recomputed:
        # a checkpointed block keeps only its input and is recomputed in backward, one at a time, beside the
        # gradient flowing back; the engine makes the embeddings' output require grad for checkpointing, so
        # checkpointed blocks keep their input whether trained or not. Blocks above them keep everything.
        kept = min(inv.layers - recomputed, layers)
        recompute = per_layer + 2 * inv.hidden * s.compute_bytes * tokens
        if s.tiled_mlp:  # one tile's MLP tensors at a time, plus every tile's input kept for its recomputation
            mlp = mlp_bytes_per_token(inv, s)
            recompute += mlp * (min(tokens, MLP_TILE_TOKENS) - tokens) + inv.hidden * s.compute_bytes * tokens
        if s.dense_weights_kept and METHODS[s.method].base_bits == 4:
            per_block: dict[int, int] = {}
            for l in _adapted(inv, s):
                per_block[l.layer] = per_block.get(l.layer, 0) + l.in_features * l.out_features
            recompute += max(per_block.values(), default=0) * s.compute_bytes
        acts = {"checkpointed block inputs": recomputed * inv.hidden * s.compute_bytes * tokens,
                "activations (blocks not checkpointed)": kept * per_layer,
                "one block recomputed + its gradients": recompute}
    else:
        acts = {"activations (blocks with gradients)": layers * per_layer,
                "one block's gradients": per_layer}
    if s.offload_activations:  # what the forward keeps waits in host memory; one block input comes back at a time
        for key in ("checkpointed block inputs", "activations (blocks not checkpointed)",
                    "activations (blocks with gradients)"):
            if acts.get(key):
                acts[HOST + key] = acts.pop(key)
        acts["one offloaded input copied back"] = inv.hidden * s.compute_bytes * tokens
    if s.attention_mask:
        acts["attention mask (packed rows)"] = s.micro_batch * s.max_seq_len ** 2  # block-diagonal, 1 byte each
    trained_tokens = tokens if s.trained_tokens is None else min(tokens, s.trained_tokens)
    chunk = min(max(64, LOSS_CHUNK_BYTES // (4 * inv.vocab)), trained_tokens)
    if METHODS[s.method].trains_base == "all":  # trained head: fp32 logits, log-softmax and their gradient, recomputed per chunk
        loss_bytes = chunk * inv.vocab * (s.compute_bytes + 4 + 4) + trained_tokens * inv.hidden * (s.compute_bytes + 4)
    else:  # frozen head: fp32 logits become probabilities in place, + their 16-bit copy; the trained rows of
        loss_bytes = (chunk * inv.vocab * (4 + s.compute_bytes)   # the hidden states and their gradient
                      + 2 * trained_tokens * inv.hidden * s.compute_bytes)
    loss = {"logits and loss (chunked)": loss_bytes}
    biggest = max((l.in_features * l.out_features for l in inv.linears), default=0)
    mlp_tokens = min(tokens, MLP_TILE_TOKENS) if s.tiled_mlp else tokens  # the MLP's matmuls run a tile at a time
    workspace = {"dequantize / matmul workspace": 2 * biggest * s.compute_bytes
                 + 2 * max(tokens * inv.hidden, mlp_tokens * inv.intermediate) * s.compute_bytes}
    weights = weight_bytes(inv, s)
    held = {**weights, **optimizer_bytes(inv, s)}
    if s.shards > 1:  # FSDP: each process keeps 1/N of every parameter, gradient and moment ...
        held = {f"{k} (1/{s.shards} shard)": v // s.shards for k, v in held.items()}
        # ... and gathers whole: the root unit (embeddings, head, norms) for the step, two blocks at a time
        block = sum(v for k, v in weights.items() if k.startswith(("quantized", "frozen", "trained")))
        held["FSDP gathered weights (root unit + 2 blocks)"] = (
            weights["16-bit weights kept (embeddings, norms, lm_head)"] + 2 * block // inv.layers)
    parts = {**held, **acts, **loss, **workspace}
    allocated = peak_allocated(parts)
    parts["allocator overhead and fragmentation"] = int(ALLOCATOR_FIXED + ALLOCATOR_FRACTION * allocated)
    parts["CUDA context"] = CUDA_CONTEXT
    return {k: int(v) for k, v in parts.items() if v}


# Alive at different moments of a step, so the peak holds only the larger of them.
TRANSIENT = ("one block recomputed + its gradients", "one block's gradients", "logits and loss (chunked)")


def peak_allocated(parts: dict[str, int]) -> int:
    """Bytes torch has allocated at the step's peak: everything persistent plus the largest transient."""
    persistent = sum(v for k, v in parts.items() if k not in TRANSIENT and not k.startswith(HOST) and k not in
                     ("allocator overhead and fragmentation", "CUDA context"))
    return persistent + max((parts.get(k, 0) for k in TRANSIENT), default=0)


def peak(parts: dict[str, int]) -> int:
    """Predicted peak GPU memory: allocated at the peak + allocator overhead + CUDA context."""
    return peak_allocated(parts) + parts.get("allocator overhead and fragmentation", 0) + parts.get("CUDA context", 0)


def host_bytes(parts: dict[str, int]) -> int:
    """Host (CPU) memory the offload policies hold, pinned."""
    return sum(v for k, v in parts.items() if k.startswith(HOST))


def step_flops(inv: Inventory, s: Settings) -> float:
    """FLOPs of one micro-batch step: 2 forward + 2 input-gradient (+2 weight-gradient for trained weights)
    per parameter and token, + one more forward when checkpointing (and of the MLPs when tiled).
    Attention scores counted too."""
    tokens = s.micro_batch * s.max_seq_len
    n = inv.total_params
    share = checkpointed_blocks(inv, s) / max(1, inv.layers)  # of the blocks, run forward twice
    per_token = (6 if METHODS[s.method].trains_base == "all" else 4) * n + 2 * n * share
    if s.tiled_mlp:  # each tile's MLP runs forward once more, in its own recomputation
        per_token += 2 * sum(l.in_features * l.out_features for l in inv.linears if _in_mlp(inv, l))
    attention = 4 * inv.layers * inv.q_dim * s.max_seq_len * (2 + share)
    return float(tokens * (per_token + attention))

