"""Unsloth's QLoRA on the same tokens as a snugtune run, for `snugtune bench --against unsloth`.

Unsloth's own loader and LoRA (its kernels, its "unsloth" offloaded gradient checkpointing), then the
same step loop, micro-batches and optimizer as the plain recipe (bench/plain.py). Needs a GPU and the
unsloth package (`../shared/tools/device-site.sh --unsloth` carries it to the GPU machine).

  python -m snugtune.bench.unsloth_stack CONFIG.yaml [key=value ...] --out unsloth.json
"""

from __future__ import annotations


def main() -> None:
    import unsloth  # before transformers and peft: it patches them on import
    from unsloth import FastLanguageModel

    import torch

    from snugtune.bench.plain import bench_inputs, cap_memory, run_steps, write_result
    from snugtune.models import block_linear_names

    out, cfg, path, tokenizer, data = bench_inputs("Unsloth's QLoRA on a snugtune bench config")
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
    write_result(out, run_steps(model, cfg, data, tokenizer, torch.device("cuda", 0), torch.bfloat16,
                                f"unsloth {getattr(unsloth, '__version__', '?')}"))


if __name__ == "__main__":
    main()
