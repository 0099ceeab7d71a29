"""Peak GPU memory of a snugtune training step, by component, from a model's config alone.

The model is instantiated on the meta device (no memory, any architecture transformers knows), so the
parameter inventory is exact; activation and workspace terms follow what the engine keeps alive
(see docs/planner.md for each term and how it is derived). All sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIB = 2**20
CUDA_CONTEXT = 500 * MIB          # driver + cuBLAS/cuDNN handles; outside torch's allocator
ALLOCATOR_FIXED = 280 * MIB       # reserved minus allocated, measured 0.25-0.43 GiB over the H100 grid
ALLOCATOR_FRACTION = 0.015        # ... growing slowly with the allocated peak (expandable segments on)
LOSS_CHUNK_BYTES = 256 * MIB      # engine/loss.py: fp32 logits held at once


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
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Inventory(config.model_type, config.hidden_size, config.intermediate_size, len(blocks),
                     config.vocab_size, heads * head_dim, kv * head_dim, heads, linears, other,
                     bool(getattr(config, "tie_word_embeddings", False)))


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


def _adapted(inv: Inventory, s: Settings) -> list[Linear]:
    first = inv.layers - s.lora_last_layers if s.lora_last_layers else 0
    return [l for l in inv.linears if l.short in s.lora_targets and l.layer >= first]


def trainable_params(inv: Inventory, s: Settings) -> int:
    if s.method in ("lora", "qlora", "lora-8bit"):
        return sum(s.lora_r * (l.in_features + l.out_features) for l in _adapted(inv, s))
    if s.method == "freeze":
        first = inv.layers - s.trainable_layers  # the blocks' norms are a few thousand values: left out
        return sum(l.in_features * l.out_features for l in inv.linears if l.layer >= first)
    return inv.total_params


def weight_bytes(inv: Inventory, s: Settings) -> dict[str, int]:
    """Base weights as stored on the GPU: quantized block linears, and the 16-bit rest."""
    n_lin = inv.linear_params
    if s.method == "qlora":
        # nf4: 0.5 byte/param; absmax per 64-value block: fp32, or 8-bit + an fp32 per 256 blocks (double quant)
        stats = n_lin / 64 * (1 + 4 / 256) if s.double_quant else n_lin / 64 * 4
        linear = {"quantized weights (4-bit + block scales)": int(n_lin / 2 + stats)}
    elif s.method == "lora-8bit":
        rows = sum(l.out_features for l in inv.linears)
        linear = {"quantized weights (8-bit + row scales)": int(n_lin + 4 * rows)}
    elif s.method == "full":
        linear = {"trained weights (fp32 masters)": 4 * n_lin}
    elif s.method == "freeze":
        trained = trainable_params(inv, s)
        linear = {"frozen 16-bit weights": s.compute_bytes * (n_lin - trained),
                  "trained weights (fp32 masters)": 4 * trained}
    else:
        linear = {"frozen 16-bit weights": s.compute_bytes * n_lin}
    other = 4 * inv.other_params if s.method == "full" else s.compute_bytes * inv.other_params
    return {**linear, "16-bit weights kept (embeddings, norms, lm_head)": other}


def optimizer_bytes(inv: Inventory, s: Settings) -> dict[str, int]:
    n = trainable_params(inv, s)
    state = 8 if s.optimizer == "adamw" else 2  # two fp32 moments, or two 8-bit moments
    label = "LoRA" if s.method in ("lora", "qlora", "lora-8bit") else "trained"
    extra = 0 if s.method in ("full", "freeze") else 4 * n  # LoRA masters (full/freeze counted as weights)
    return {f"{label} parameters (fp32)": extra, f"{label} gradients (fp32)": 4 * n,
            f"optimizer state ({s.optimizer})": state * n}


def activation_bytes_per_token_layer(inv: Inventory, s: Settings) -> int:
    """Tensors one transformer block keeps for backward, per token (no checkpointing).

    Each RMSNorm keeps an fp32 copy of its input, the normalized value cast back and its output
    (4+2+2 bytes per hidden unit). Attention keeps q and k before RoPE, their rotate_half, q and k after
    RoPE, v, the attention output and its contiguous copy for o_proj (5 q-sized and 4 kv-sized tensors)
    and an fp32 log-sum-exp per head. The MLP keeps gate, up, act(gate) and their product. Every adapted
    linear keeps the autocast copy of its input made for the fp32 LoRA matrices, and its rank-r output.
    """
    c = s.compute_bytes
    norms = 2 * inv.hidden * (4 + 2 * c)
    attention = c * (5 * inv.q_dim + 4 * inv.kv_dim) + 4 * inv.heads
    mlp = 4 * c * inv.intermediate
    lora = 0
    if s.method in ("lora", "qlora", "lora-8bit"):
        adapted = {}
        for linear in _adapted(inv, s):
            adapted.setdefault(linear.short, linear.in_features)
        lora = sum(c * width + 4 * s.lora_r for width in adapted.values())
    return norms + attention + mlp + lora


def blocks_with_gradients(inv: Inventory, s: Settings) -> int:
    """Blocks that backward passes through without checkpointing: from the first trained block to the
    top. Below it nothing requires grad, so autograd keeps no activations there (freeze, or LoRA on the
    last layers only)."""
    if s.method == "freeze":
        return min(inv.layers, s.trainable_layers)
    if s.method in ("lora", "qlora", "lora-8bit"):
        adapted = _adapted(inv, s)
        return inv.layers - min(l.layer for l in adapted) if adapted else 0
    return inv.layers


def estimate(inv: Inventory, s: Settings) -> dict[str, int]:
    """Peak memory breakdown (component -> bytes) for one training step; see peak()."""
    tokens = s.micro_batch * s.max_seq_len
    per_layer = activation_bytes_per_token_layer(inv, s) * tokens
    layers = blocks_with_gradients(inv, s)
    if s.grad_checkpointing:
        # every block's input is kept; one block is recomputed at a time, beside the gradient flowing back
        # the engine makes the embeddings' output require grad for checkpointing, so every block is
        # checkpointed and keeps its input, trained or not
        acts = {"checkpointed block inputs": inv.layers * inv.hidden * s.compute_bytes * tokens,
                "one block recomputed + its gradients": per_layer + 2 * inv.hidden * s.compute_bytes * tokens}
    else:
        acts = {"activations (blocks with gradients)": layers * per_layer,
                "one block's gradients": per_layer}
    acts["attention mask (packed rows)"] = s.micro_batch * s.max_seq_len ** 2  # block-diagonal, 1 byte each
    trained_tokens = tokens  # upper bound: every position trained
    chunk = max(64, LOSS_CHUNK_BYTES // (4 * inv.vocab))
    loss = {"logits and loss (chunked)": min(chunk, trained_tokens) * inv.vocab * (s.compute_bytes + 4 + 4)
            + trained_tokens * inv.hidden * (s.compute_bytes + 4)}
    biggest = max((l.in_features * l.out_features for l in inv.linears), default=0)
    workspace = {"dequantize / matmul workspace": 2 * biggest * s.compute_bytes
                 + 2 * tokens * max(inv.hidden, inv.intermediate) * s.compute_bytes}
    parts = {**weight_bytes(inv, s), **optimizer_bytes(inv, s), **acts, **loss, **workspace}
    allocated = peak_allocated(parts)
    parts["allocator overhead and fragmentation"] = int(ALLOCATOR_FIXED + ALLOCATOR_FRACTION * allocated)
    parts["CUDA context"] = CUDA_CONTEXT
    return {k: int(v) for k, v in parts.items() if v}


# Alive at different moments of a step, so the peak holds only the larger of them.
TRANSIENT = ("one block recomputed + its gradients", "one block's gradients", "logits and loss (chunked)")


def peak_allocated(parts: dict[str, int]) -> int:
    """Bytes torch has allocated at the step's peak: everything persistent plus the largest transient."""
    persistent = sum(v for k, v in parts.items() if k not in TRANSIENT and k not in
                     ("allocator overhead and fragmentation", "CUDA context"))
    return persistent + max((parts.get(k, 0) for k in TRANSIENT), default=0)


def peak(parts: dict[str, int]) -> int:
    """Predicted peak GPU memory: allocated at the peak + allocator overhead + CUDA context."""
    return peak_allocated(parts) + parts.get("allocator overhead and fragmentation", 0) + parts.get("CUDA context", 0)


def step_flops(inv: Inventory, s: Settings) -> float:
    """FLOPs of one micro-batch step: 2 forward + 2 input-gradient (+2 weight-gradient for trained weights)
    per parameter and token, + one more forward when checkpointing. Attention scores counted too."""
    tokens = s.micro_batch * s.max_seq_len
    n = inv.total_params
    per_token = (6 if s.method in ("full",) else 4) * n + (2 * n if s.grad_checkpointing else 0)
    attention = 4 * inv.layers * inv.q_dim * s.max_seq_len * (3 if s.grad_checkpointing else 2)
    return float(tokens * (per_token + attention))

