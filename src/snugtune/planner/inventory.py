"""What memory depends on in a model, read offline from its config: the model is instantiated on the meta
device (no memory, any architecture transformers knows), so the parameter inventory is exact."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snugtune.config import Config
from snugtune.memory_rules import config_draws_random_numbers
from snugtune.models.resolve import offline_model_config


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
    draws_random_numbers: bool = False  # the model's own config has dropout (no CUDA graphs then)

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
                     getattr(config, "hidden_act", "silu"),
                     config_draws_random_numbers(config))


def model_config_for(cfg: Config):
    """The transformers config of cfg.model without loading weights (registry shapes offline)."""
    return offline_model_config(cfg.model)


def inventory_for(cfg: Config) -> Inventory:
    """The inventory of cfg.model, offline."""
    return inventory_from_config(model_config_for(cfg))


def inventory_of_folder(folder: Path, trust_remote_code: bool = False) -> Inventory:
    """The inventory of a model folder's config.json (a resolved base model: local, converted or downloaded)."""
    from transformers import AutoConfig
    return inventory_from_config(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
