"""Unsloth's DPO as its docs show it, on the pairs of a snugtune DPO bench config, for `snugtune bench --objective
dpo --against unsloth`: PatchDPOTrainer() before TRL's DPOTrainer, Unsloth's own 4-bit loader and LoRA (its
kernels, its "unsloth" offloaded gradient checkpointing), the reference the adapter disabled (ref_model=None),
the same DPOConfig, rows and timing as the TRL stack (bench.trl_dpo). Needs a GPU and the unsloth package.

  python -m snugtune.bench.unsloth_dpo CONFIG.yaml [key=value ...] --out unsloth.json
"""

from __future__ import annotations

from pathlib import Path


def main() -> None:
    import unsloth  # before transformers, peft and trl: it patches them on import
    from unsloth import FastLanguageModel, PatchDPOTrainer

    from snugtune.bench.trl_dpo import bench_setup, dpo_arguments, measure, preference_rows
    out, cfg, path, device, dtype = bench_setup("Unsloth's DPO on a snugtune DPO bench config")
    PatchDPOTrainer()
    from datasets import Dataset
    from trl import DPOTrainer

    from snugtune.bench.plain import write_result
    from snugtune.registry import block_linear_names
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=cfg.max_seq_len,
                                                         dtype=dtype, load_in_4bit=True)
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(model.config.model_type)
    model = FastLanguageModel.get_peft_model(model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=list(targets),
                                             bias="none", use_gradient_checkpointing="unsloth",
                                             random_state=cfg.train.seed, max_seq_length=cfg.max_seq_len)
    args = dpo_arguments(cfg, Path(out).parent / "unsloth-out", device, dtype)
    args.gradient_checkpointing = False  # Unsloth checkpoints in its own way (set above)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(preference_rows(cfg.data.path)))
    write_result(out, measure(trainer, cfg, device, f"unsloth {getattr(unsloth, '__version__', '?')} DPO "
                                                   f"(PatchDPOTrainer)"))


if __name__ == "__main__":
    main()
