"""Random-weight models of a registry shape (`model: shape:NAME`), built once into the cache: the planner,
`bench` and the GPU tests run real architectures without downloading weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from snugtune.models.cache import staged_cache_folder
from snugtune.models.embedded import embedded_tokenizer_dir
from snugtune.registry import shape_config

SHAPE_MARKER = "snugtune-shape.json"  # written last: a folder without it is not a finished build


def shape_transformers_config(shape: str, tokenizer_vocab: int = 0, **token_ids):
    """The transformers config of registry shape `shape` (KeyError if unknown), its vocabulary grown to hold
    `tokenizer_vocab` ids. The shared tokenizer has 49,152; 32k-vocabulary shapes (Llama-2, Mistral,
    TinyLlama) grow to hold them, so their embedding and head are larger than the real model's
    (see docs/decisions.md)."""
    from transformers import AutoConfig
    fields = shape_config(shape)
    model_type = fields.pop("model_type")
    fields["vocab_size"] = max(fields["vocab_size"], tokenizer_vocab)
    return AutoConfig.for_model(model_type, **fields, **token_ids)


def build_shape_model(shape: str, cache_dir: Path) -> Path:
    """A random-weight model of a registry shape, saved once (seed 0, bf16) as an HF folder with the embedded
    default's tokenizer."""
    target = cache_dir / "models" / f"shape-{shape}"
    if (target / SHAPE_MARKER).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir(cache_dir))
    config = shape_transformers_config(shape, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU init: seconds, not minutes, at 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp, commit = staged_cache_folder(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / SHAPE_MARKER).write_text(json.dumps({"shape": shape, "seed": 0}))
    del model
    return commit()
