"""Unsloth's QLoRA as its users run it, on the tokens of a snugtune run, for `snugtune bench --against unsloth`.

Unsloth's own loader and LoRA (its kernels, its "unsloth" offloaded gradient checkpointing), fed the way
its notebooks feed it: rows of exactly max_seq_len tokens (the run's training samples in the run's
order, laid end to end and cut; every step the same shape, no position ids, no masks), its own model
loss (labels = input ids), no autocast around the model (Unsloth sets its own dtypes), bitsandbytes'
AdamW 8-bit over the LoRA tensors as transformers' Trainer builds it for optim="adamw_8bit", gradient
clipping at 1.0. Needs a GPU and the unsloth package (`../shared/tools/device-site.sh --unsloth`
carries it to the GPU machine).

  python -m snugtune.bench.unsloth_stack CONFIG.yaml [key=value ...] --out unsloth.json
"""

from __future__ import annotations

import time


def fixed_length_rows(samples, seq: int, rows: int, seed: int):
    """[rows, seq] token ids: the samples of epoch 0 in training order, end to end, cut every seq tokens
    (repeating the epoch if it holds fewer than rows x seq tokens)."""
    import torch

    from snugtune.data.batches import epoch_rows
    stream = [t for row in epoch_rows(samples, seed, 0, seq) for sample in row for t in sample.input_ids]
    if not stream:
        raise ValueError("no training tokens")
    needed = rows * seq
    stream = (stream * (needed // len(stream) + 1))[:needed]
    return torch.tensor(stream, dtype=torch.long).view(rows, seq)


def train_steps(model, cfg, ids, device, recipe: str, scaler) -> dict:
    """cfg.train.max_steps optimizer steps of micro_batch x grad_accum rows of `ids`; the bench result. scaler:
    fp16's GradScaler (disabled under bf16)."""
    import bitsandbytes as bnb

    from snugtune.bench.plain import learning_rate_schedule, optimizer_step, step_result, sync
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=cfg.train.lr)
    scheduler = learning_rate_schedule(optimizer, cfg)
    batch, accumulation = cfg.train.micro_batch, cfg.train.grad_accum
    step_times, step_tokens, losses = [], [], []
    model.train()
    for step in range(cfg.train.max_steps):
        sync(device)
        start = time.perf_counter()
        for micro in range(accumulation):
            at = ((step * accumulation + micro) * batch) % (len(ids) - batch + 1)
            rows = ids[at:at + batch].to(device, non_blocking=True)
            loss = model(input_ids=rows, labels=rows).loss / accumulation
            scaler.scale(loss).backward()
        optimizer_step(params, optimizer, device, scaler)
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        step_tokens.append(batch * accumulation * ids.shape[1])
        losses.append(float(loss.detach()) * accumulation)
    return step_result(recipe, cfg, step_times, step_tokens, losses, device)


def main() -> None:
    import unsloth  # before transformers and peft: it patches them on import
    from unsloth import FastLanguageModel

    import torch

    from snugtune.bench.plain import attention_kernels, bench_inputs, stack_precision, write_result
    from snugtune.engine.machine import cap_memory
    from snugtune.registry import block_linear_names

    out, cfg, path, tokenizer, data = bench_inputs("Unsloth's QLoRA on a snugtune bench config")
    torch.cuda.reset_peak_memory_stats()
    cap_memory(torch.device("cuda", 0), cfg.budget)
    precision = stack_precision(cfg, torch.device("cuda", 0))
    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=cfg.max_seq_len,
                                                 dtype=precision.compute_dtype, load_in_4bit=True)
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(model.config.model_type)
    model = FastLanguageModel.get_peft_model(model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=list(targets),
                                             bias="none", random_state=cfg.train.seed,
                                             use_gradient_checkpointing="unsloth" if cfg.train.grad_checkpointing
                                             else False)
    FastLanguageModel.for_training(model)
    rows = cfg.train.max_steps * cfg.train.grad_accum * cfg.train.micro_batch
    ids = fixed_length_rows(data.train, cfg.max_seq_len, rows, cfg.train.seed)
    recipe = f"unsloth {getattr(unsloth, '__version__', '?')}: fixed-length rows, its own loss"
    with attention_kernels(cfg):
        result = train_steps(model, cfg, ids, torch.device("cuda", 0), recipe, precision.grad_scaler())
    write_result(out, {**result, "precision": precision.name})


if __name__ == "__main__":
    main()
