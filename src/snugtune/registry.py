"""Architecture registry: config shapes (no weights) of the models snugtune plans and benchmarks, and the
model families snugtune knows (LoRA targets, GGUF architecture, lean norm).

Literal data, shapes copied from each model's published config.json. `shape:NAME` builds a random-weight
model of NAME; `shape:tiny-NAME` shrinks NAME's family to a few MB for tests. A test keeps the
recipe configs in examples/ and this table in sync.
"""

from __future__ import annotations

from dataclasses import dataclass

# hub id -> registry name, for `plan` from a hub id offline and for tests that swap the recipe model.
HUB_IDS = {
    "codellama/CodeLlama-7b-Instruct-hf": "codellama-7b",
    "microsoft/phi-2": "phi-2",
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-r1-distill-qwen-1.5b",
    "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "stabilityai/stable-code-3b": "stable-code-3b",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "tinyllama-1.1b",
    "meta-llama/Llama-3.1-8B": "llama3-8b",
    "meta-llama/Llama-3.2-1B": "llama3.2-1b",
    "meta-llama/Llama-3.2-3B": "llama3.2-3b",
    "google/gemma-7b": "gemma-7b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}

_LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)

SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                           tie_word_embeddings=False),
    "llama2-7b": _LLAMA2_7B,
    "codellama-7b": {**_LLAMA2_7B, "vocab_size": 32016, "max_position_embeddings": 16384, "rope_theta": 1000000.0},
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192),
                      tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192),
                        tie_word_embeddings=True),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192),
                        tie_word_embeddings=True),
    "phi-2": dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=51200, max_position_embeddings=2048,
                  layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.4, hidden_act="gelu_new",
                  tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True),
    "deepseek-r1-distill-qwen-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                          vocab_size=151936, max_position_embeddings=131072, rms_norm_eps=1e-6,
                                          rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    "stable-code-3b": dict(model_type="stablelm", hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=50304,
                           max_position_embeddings=16384, layer_norm_eps=1e-5, rope_theta=10000.0,
                           partial_rotary_factor=0.25, use_qkv_bias=True, tie_word_embeddings=False),
    "gemma-7b": dict(model_type="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                     max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                     hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}

# The linear layers of a Llama-style block: attention's projections and the gated (SwiGLU) MLP.
_LLAMA_BLOCK = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """What snugtune knows of one model family (a transformers `model_type`)."""
    block_linears: tuple[str, ...]         # the linear layers of a block: LoRA targets, the 'all-linear' expansion
    gguf_arch: str | None = None           # the llama.cpp architecture export.gguf_file writes it as; None: refused
    gguf_pre_tokenizer: str | None = None  # llama.cpp's pre-tokenizer where the family fixes it; None: told by vocabulary
    lean_norm: str | None = None           # its transformers RMSNorm class, whose forward engine.lean_norm computes
                                           # keeping less; None: the family's norm is kept as it is
    mlp_norm: str | None = None            # the block's norm whose output only the MLP reads (engine.tiling runs it
                                           # inside the MLP's tiles); None: not moved


_MLP_NORM = "post_attention_layernorm"  # Llama-style blocks: h + mlp(post_attention_layernorm(h))

# model_type -> its family. A new family is one entry here; tests/test_registry.py checks each against
# transformers (its block linears, its norm class) and llama.cpp (its architecture), and every shape has one.
FAMILIES: dict[str, Family] = {
    "llama": Family(_LLAMA_BLOCK, gguf_arch="llama", lean_norm="LlamaRMSNorm", mlp_norm=_MLP_NORM),
    "mistral": Family(_LLAMA_BLOCK, gguf_arch="llama", lean_norm="MistralRMSNorm",  # as llama.cpp writes Mistral
                      mlp_norm=_MLP_NORM),
    "qwen2": Family(_LLAMA_BLOCK, gguf_arch="qwen2", gguf_pre_tokenizer="qwen2", lean_norm="Qwen2RMSNorm",
                    mlp_norm=_MLP_NORM),
    "qwen3": Family(_LLAMA_BLOCK, lean_norm="Qwen3RMSNorm", mlp_norm=_MLP_NORM),
    "gemma": Family(_LLAMA_BLOCK),  # GemmaRMSNorm scales by 1 + weight, not the lean norm's formula
    "stablelm": Family(_LLAMA_BLOCK),  # LayerNorm
    "phi": Family(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),  # LayerNorm, one per block
}

SHAPE_TOKENIZER_VOCAB = 49152  # ids of the embedded default's tokenizer, which shape models share


def shape_config(name: str) -> dict:
    """The config dict of registry shape `name` or `tiny-NAME` (a shrunk NAME). KeyError if unknown."""
    if name in SHAPES:
        return dict(SHAPES[name])
    if name.startswith("tiny-") and name[5:] in SHAPES:
        full = SHAPES[name[5:]]
        grouped = full["num_key_value_heads"] < full["num_attention_heads"]
        shrunk = dict(full, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2 if grouped else 4, vocab_size=SHAPE_TOKENIZER_VOCAB,
                      max_position_embeddings=4096)
        shrunk.pop("head_dim", None)
        if "sliding_window" in shrunk:
            shrunk["sliding_window"] = 4096
        return shrunk
    raise KeyError(name)


def shape_names() -> list[str]:
    """All names `shape:` accepts (the tiny- variants included)."""
    return sorted(SHAPES) + sorted(f"tiny-{n}" for n in SHAPES if n != "tiny")


def block_linear_names(model_type: str) -> list[str]:
    """The linear layers inside a transformer block of this family ('all-linear'); a Llama's if it is not listed."""
    return list(FAMILIES.get(model_type, FAMILIES["llama"]).block_linears)
