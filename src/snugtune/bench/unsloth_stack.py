"""Unsloth's QLoRA on the same tokens as a snugtune run, for `snugtune bench --against unsloth`.

Unsloth's own loader and LoRA (its kernels, its "unsloth" offloaded gradient checkpointing), then the
same step loop, micro-batches and optimizer as the plain recipe (bench/plain.py). Needs a GPU and the
unsloth package (`../shared/tools/device-site.sh --unsloth` carries it to the GPU machine).

  python -m snugtune.bench.unsloth_stack CONFIG.yaml [key=value ...] --out unsloth.json
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import unsloth  # before transformers and peft: it patches them on import
    from unsloth import FastLanguageModel

    import torch

    from snugtune.bench.plain import cap_memory, run_steps
    from snugtune.config import load_config
    from snugtune.data import prepare_data
    from snugtune.models import block_linear_names, load_tokenizer, resolve_model

    cfg = load_config(args.config, args.overrides)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    cap_memory(cfg)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=cfg.max_seq_len,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(model.config.model_type)
    model = FastLanguageModel.get_peft_model(model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=list(targets),
                                             bias="none", random_state=cfg.train.seed,
                                             use_gradient_checkpointing="unsloth" if cfg.train.grad_checkpointing
                                             else False)
    result = run_steps(model, cfg, data, tokenizer, device, torch.bfloat16,
                       f"unsloth {getattr(unsloth, '__version__', '?')}")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
