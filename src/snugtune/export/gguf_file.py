"""Writing a merged HF folder as a GGUF file (llama.cpp, Ollama, LM Studio), with the `gguf` package.

Supported: Llama-architecture models (Llama 1/2/3/3.1, CodeLlama, TinyLlama, SmolLM, Mistral as
llama.cpp writes it) and Qwen2; tokenizers that are byte-level BPE (SmolLM2, Qwen2, Llama-3) or
SentencePiece-style BPE with byte fallback (Llama-2, CodeLlama, TinyLlama, Mistral); the default RoPE
and Llama-3.1's "llama3" RoPE scaling (written as llama.cpp's rope_freqs factors). Anything else is
refused with a clear error rather than written wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from snugtune.errors import UserError
from snugtune.export.quantize import llama_cpp_bindings, quantize_gguf
from snugtune.registry import FAMILIES

# model type -> the llama.cpp architecture it is written as (registry.FAMILIES); other types are refused
ARCHES = {model_type: family.gguf_arch for model_type, family in FAMILIES.items() if family.gguf_arch}
# f16 and q8_0 are written here (q8_0 with llama.cpp's gguf package); the others are llama.cpp quantizations of
# the f16 file (export.quantize)
WRITTEN_TYPES = ("f16", "q8_0")
TYPES = (*WRITTEN_TYPES, "q4_0", "q4_k_m", "q5_k_m", "q6_k")


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


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _adds_bos(tok: dict, tokenizer_config: dict) -> bool:
    """Whether the tokenizer starts every text with BOS: tokenizer_config's flag where it has one
    (transformers 4), else the first piece of tokenizer.json's post-processor template (transformers 5)."""
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    post = tok.get("post_processor") or {}
    single = post.get("single") or [{}]
    return "SpecialToken" in single[0] and single[0]["SpecialToken"]["id"] == tokenizer_config.get("bos_token")


def _tokenizer_metadata(folder: Path, tokenizer_config: dict) -> dict:
    """The tokenizer as GGUF stores it: model "gpt2" (byte-level BPE: tokens, types, merges) or "llama"
    (SentencePiece-style BPE with byte fallback: tokens, scores, types); and whether it adds BOS."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    model = tok.get("model", {})
    pre = json.dumps(tok.get("pre_tokenizer"))
    spm = model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" not in pre
    if model.get("type") != "BPE" or not (spm or "ByteLevel" in pre):
        raise UserError(f"{folder}: GGUF export supports byte-level BPE tokenizers (SmolLM2, Qwen2, Llama-3) and "
                        f"SentencePiece-style BPE with byte fallback (Llama-2, Mistral, TinyLlama); this one is "
                        f"{model.get('type')}{' without byte fallback' if model.get('type') == 'BPE' else ''}")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    added: set[int] = set()
    for token in tok.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
        (special if token.get("special") else added).add(token["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not spm:
        types = [3 if i in special else 1 for i in range(size)]  # 3 = control, 1 = normal
        return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges,
                "add_bos": _adds_bos(tok, tokenizer_config)}
    # llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose concatenation has
    # the highest score: a token made by the merge of rank r scores -r, so both merge in the same order.
    scores = [0.0] * size
    made = {}
    for rank, merge in enumerate(merges):
        made.setdefault(merge.replace(" ", ""), -float(rank))
    unk_text = model.get("unk_token") or tokenizer_config.get("unk_token") or ""
    unk = vocab.get(unk_text["content"] if isinstance(unk_text, dict) else unk_text, -1)
    types = []
    for i, text in enumerate(tokens):
        if i == unk:
            types.append(2)  # unknown
        elif i in special:
            types.append(3)  # control
        elif i in added:
            types.append(4)  # user-defined
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(6)  # byte fallback
        else:
            types.append(1)
            scores[i] = made.get(text, -float(len(merges) + i))  # never made by a merge: lowest priority
    normalizers = json.dumps(tok.get("normalizer"))
    prefix = ('"Prepend"' in normalizers or ('"Metaspace"' in pre and '"never"' not in pre))
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "merges": merges,
            "unk": unk if unk >= 0 else None, "space_prefix": prefix,
            "add_bos": _adds_bos(tok, tokenizer_config)}


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama-3.1's RoPE scaling as llama.cpp stores it: one divisor per frequency (rope_freqs), as its
    converter computes it. None for the default RoPE; UserError for other scalings."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"GGUF export supports the default RoPE and Llama-3.1's llama3 scaling, not {kind}")
    theta = config.get("rope_theta") or scaling.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), \
        scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _pre_tokenizer_name(config: dict, tokens: list[str]) -> str:
    fixed = FAMILIES[config["model_type"]].gguf_pre_tokenizer  # the family's own (Qwen2), else told by vocabulary
    if fixed:
        return fixed
    if "<|im_start|>" in tokens and len(tokens) == 49152:
        return "smollm"
    if len(tokens) >= 128000 and "<|begin_of_text|>" in tokens:
        return "llama-bpe"
    return "default"


def read_chat_template(model_dir: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's (older folders)."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    return _tokenizer_config(model_dir).get("chat_template")


def check_gguf_type(gguf_type: str) -> None:
    """UserError unless gguf_type is one export_gguf writes here, with what it needs installed."""
    if gguf_type not in TYPES:
        raise UserError(f"--gguf-type: choose one of {', '.join(TYPES)}")
    if gguf_type not in WRITTEN_TYPES:
        llama_cpp_bindings(f"--gguf-type {gguf_type}")


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "f16") -> Path:
    """Write model_dir as a GGUF of gguf_type: f16 and q8_0 directly, the others by llama.cpp's quantizer
    from an f16 file written first (and removed after). Returns out_file."""
    check_gguf_type(gguf_type)
    if gguf_type in WRITTEN_TYPES:
        return write_gguf(model_dir, out_file, gguf_type)
    out_file = Path(out_file)
    f16 = write_gguf(model_dir, out_file.with_name(f".{out_file.name}.f16-{os.getpid()}"), "f16")
    try:
        return quantize_gguf(f16, out_file, gguf_type)
    finally:
        f16.unlink()


def write_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "f16") -> Path:
    """Write model_dir (a merged HF folder) as one GGUF file, atomically. Returns out_file."""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text())
    arch = ARCHES.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"{model_dir}: GGUF export supports {', '.join(sorted(ARCHES))} models, "
                        f"not {config.get('model_type')}")
    try:
        rope_factors = llama3_rope_factors(config)
    except UserError as exc:
        raise UserError(f"{model_dir}: {exc}") from None
    if rope_factors is not None and arch != "llama":
        raise UserError(f"{model_dir}: llama3 RoPE scaling is written for Llama-architecture models only")
    if gguf_type not in WRITTEN_TYPES:
        raise UserError(f"--gguf-type: choose one of {', '.join(WRITTEN_TYPES)}")
    tokenizer_config = _tokenizer_config(model_dir)
    tok = _tokenizer_metadata(model_dir, tokenizer_config)
    template = read_chat_template(model_dir)

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
    writer.add_tokenizer_model(tok["model"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["model"] == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(config, tok["tokens"]))
    else:
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["space_prefix"])
        if tok["unk"] is not None:
            writer.add_unk_token_id(tok["unk"])
    writer.add_token_merges(tok["merges"])  # llama.cpp's SentencePiece path ignores them; transformers reads them
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int):
            setter(config[key])
    writer.add_add_bos_token(tok["add_bos"])
    if template:
        writer.add_chat_template(template)

    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
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
