"""A GGUF file dequantized into an fp32 safetensors HF folder, once, in the cache: transformers and peft
then load it like any other base (and peft alone can load base + adapter from a run folder)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from snugtune.models.cache import staged_cache_folder

CONVERSION_VERSION = "1"  # bump when the conversion below changes, so caches rebuild
CONVERTED_MARKER = "snugtune-converted.json"  # written last: a folder without it is not a finished conversion


def is_converted(target: Path) -> bool:
    """Whether target holds a finished conversion."""
    return (target / CONVERTED_MARKER).is_file()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into an fp32 safetensors HF folder (once; cached at `target`)."""
    if is_converted(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # the weights are plain fp32 now
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    # transformers' GGUF tokenizer conversion can name the wrong special tokens; the model config is right.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if config.bos_token_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(config.bos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = config.eos_token_id
    tmp, commit = staged_cache_folder(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"from": str(gguf), "conversion": CONVERSION_VERSION}))
    return commit()
