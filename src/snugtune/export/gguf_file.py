"""Writing a merged HF folder as a GGUF file (llama.cpp, Ollama, LM Studio), with the `gguf` package.

Supported: Llama-architecture models (Llama, TinyLlama, SmolLM, Mistral as llama.cpp writes it) and
Qwen2, with byte-level BPE tokenizers (tokenizer.json: SmolLM2, Qwen2, Llama-3) and the default RoPE.
Others are refused with a clear error rather than written wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from snugtune.config import UserError

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
TYPES = ("f16", "q8_0")


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half RoPE layout -> GGML's interleaved one (llama.cpp's convert does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> str | None:
    simple = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
    if name in simple:
        return simple[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    block, rest = parts[2], ".".join(parts[3:])
    mapping = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{block}.{mapping[rest]}" if rest in mapping else None


def _tokenizer_metadata(folder: Path) -> dict:
    tok = json.loads((folder / "tokenizer.json").read_text())
    model = tok.get("model", {})
    pre = json.dumps(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise UserError(f"{folder}: GGUF export supports byte-level BPE tokenizers (SmolLM2, Qwen2, Llama-3); "
                        f"this one is {model.get('type')} (SentencePiece-style tokenizers are not supported yet)")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [3 if i in special else 1 for i in range(size)]  # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _pre_tokenizer_name(config: dict, tokens: list[str]) -> str:
    if config["model_type"] == "qwen2":
        return "qwen2"
    if "<|im_start|>" in tokens and len(tokens) == 49152:
        return "smollm"
    if len(tokens) >= 128000 and "<|begin_of_text|>" in tokens:
        return "llama-bpe"
    return "default"


def write_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "f16") -> Path:
    """Write model_dir (a merged HF folder) as one GGUF file, atomically. Returns out_file."""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text())
    arch = ARCHES.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"{model_dir}: GGUF export supports {', '.join(sorted(ARCHES))} models, "
                        f"not {config.get('model_type')}")
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise UserError(f"{model_dir}: GGUF export supports the default RoPE only (this model scales it)")
    if gguf_type not in TYPES:
        raise UserError(f"--gguf-type: choose one of {', '.join(TYPES)}")
    tok = _tokenizer_metadata(model_dir)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = (model_dir / "chat_template.jinja").read_text() if (model_dir / "chat_template.jinja").is_file() \
        else tokenizer_config.get("chat_template")

    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(config, tok["tokens"]))
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int):
            setter(config[key])
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    if template:
        writer.add_chat_template(template)

    weight_files = sorted(model_dir.glob("*.safetensors"))
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                target = _gguf_name(name)
                if target is None:
                    raise UserError(f"{path}: tensor {name} has no GGUF name for {arch}")
                array = handle.get_tensor(name).to(torch.float32).numpy()
                if arch == "llama" and target.endswith("attn_q.weight"):
                    array = _permute_qk(array, n_head)
                elif arch == "llama" and target.endswith("attn_k.weight"):
                    array = _permute_qk(array, n_kv)
                if array.ndim == 1:
                    writer.add_tensor(target, array.astype(np.float32))
                elif gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
                    writer.add_tensor(target, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    writer.add_tensor(target, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_file)
    return out_file
