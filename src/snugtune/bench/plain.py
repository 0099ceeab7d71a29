"""The plain transformers + peft + bitsandbytes QLoRA recipe (DESIGN §10), on the same tokens as a snugtune run.

What a user copies from a notebook: 4-bit nf4 double-quant base, prepare_model_for_kbit_training (which
up-casts embeddings, norms and lm_head to fp32 and turns on reentrant gradient checkpointing), LoRA,
bf16 autocast (fp16 with a GradScaler where train.precision says so, as Trainer's fp16=True on a T4),
full-vocabulary logits and the model's own loss. Same data, order and batches as snugtune (its data pipeline
tokenizes them), so tokens/s compare like for like. train.attention_kernels: sm75 holds SDPA to a T4's kernels.

  python -m snugtune.bench.plain CONFIG.yaml [key=value ...] --out plain.json   (snugtune bench runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from snugtune.precision import Precision, resolve_precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(model, cfg, data, tokenizer, device: torch.device, precision: Precision, recipe: str) -> dict:
    """Train cfg.train.max_steps steps on the micro-batches snugtune would train on; timings and memory.

    The same micro-batches snugtune trains on (lengths rounded up alike): packed rows (position ids restart per sample, which
    transformers turns into a block-diagonal mask) or padded samples, per data.packing; the model's own
    loss; the optimizer the config names. Tokens/s is the median over the warm steps (after the third)."""
    import bitsandbytes as bnb

    from snugtune.data.batches import GPU_PAD_MULTIPLE, collate_micro_batch, micro_batches, real_tokens
    cuda = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit,
                 "adamw": torch.optim.AdamW}[cfg.train.optimizer](params, lr=cfg.train.lr)
    scheduler = learning_rate_schedule(optimizer, cfg)
    scaler = precision.grad_scaler()
    model.train()
    step_times, step_tokens, losses = [], [], []
    packed_len = cfg.max_seq_len if cfg.data.packing else None
    batches = micro_batches(data.train, cfg.train.micro_batch, cfg.train.seed, 0, packed_len)
    steps = cfg.train.max_steps
    for step in range(steps):
        group = batches[(step * cfg.train.grad_accum) % len(batches):][: cfg.train.grad_accum]
        sync(device)
        start = time.perf_counter()
        tokens = 0
        for rows in group:
            batch = collate_micro_batch(rows, tokenizer.pad_token_id, cfg.data.packing, GPU_PAD_MULTIPLE if cuda else 1,
                                        cfg.max_seq_len)
            tokens += real_tokens(batch)
            batch = {k: v.to(device) for k, v in batch.items() if k not in ("token_mask", "cu_seq_lens")}
            with precision.autocast():
                loss = model(**batch).loss / len(group)
            scaler.scale(loss).backward()
        optimizer_step(params, optimizer, device, scaler)
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        step_tokens.append(tokens)
        losses.append(float(loss.detach()) * len(group))
    return step_result(recipe, cfg, step_times, step_tokens, losses, device)


def learning_rate_schedule(optimizer, cfg):
    """The config's schedule over max_steps as transformers' Trainer builds it, with the engine's warmup steps."""
    from transformers import get_scheduler

    from snugtune.engine.optim import warmup_steps
    steps = cfg.train.max_steps
    return get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=warmup_steps(cfg.train, steps),
                         num_training_steps=steps)


def optimizer_step(params, optimizer, device: torch.device, scaler: torch.amp.GradScaler) -> None:
    """Unscale (fp16), clip the gradients' norm at 1.0 (transformers' Trainer default), step (skipped on inf/NaN
    under fp16), clear; wait for the GPU."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sync(device)


def attention_kernels(cfg):
    """The SDPA kernels train.attention_kernels allows, as a context around the training loop."""
    from snugtune.attention import SM75_BACKENDS
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(SM75_BACKENDS) if cfg.train.attention_kernels == "sm75" else contextlib.nullcontext()


def stack_precision(cfg, device: torch.device) -> Precision:
    """train.precision as snugtune's run of the same config resolves it (auto: bf16 where the GPU has it; on a
    CPU, bf16 where it multiplies bf16 natively, else fp32), so every stack of a bench computes alike."""
    return resolve_precision(cfg.train.precision, device)


def step_result(recipe: str, cfg, step_times: list[float], step_tokens: list[int], losses: list[float],
                device: torch.device) -> dict:
    """A stack's bench result: tokens/s (median over the warm steps, after the third), memory, losses."""
    cuda = device.type == "cuda"
    steps = len(step_times)
    warm = slice(min(3, steps - 1), None)
    return {"recipe": recipe, "model": cfg.model, "steps": steps,
            "tokens_per_s_median_step": statistics.median(t / s for t, s in zip(step_tokens[warm], step_times[warm])),
            "tokens_per_s_overall": sum(step_tokens[warm]) / sum(step_times[warm]),
            "step_seconds_median": statistics.median(step_times[warm]),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "loss_first": losses[0], "loss_last": losses[-1],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def bench_arguments(description: str):
    """Parse `CONFIG [key=value ...] --out FILE`: (the result file, the config)."""
    from snugtune.config import load_config
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    return args.out, load_config(args.config, args.overrides)


def bench_inputs(description: str):
    """Parse `CONFIG [key=value ...] --out FILE`; load the config, the checkpoint's path, tokenizer and data."""
    from snugtune.data.prepare import prepare_data
    from snugtune.models.load import load_tokenizer
    from snugtune.models.resolve import resolve_model

    out, cfg = bench_arguments(description)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    return out, cfg, path, tokenizer, prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)


def write_result(out: str, result: dict) -> None:
    with open(out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


def main() -> None:
    out, cfg, path, tokenizer, data = bench_inputs("the plain transformers+peft+bitsandbytes QLoRA recipe")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from snugtune.engine.machine import cap_memory
    from snugtune.registry import block_linear_names

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precision = stack_precision(cfg, device)
    dtype = precision.compute_dtype
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cap_memory(device, cfg.budget)  # the cap the engine applies for the same budget
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.type,
                               bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.grad_checkpointing)
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(model.config.model_type)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=list(targets), task_type="CAUSAL_LM"))
    with attention_kernels(cfg):
        result = run_steps(model, cfg, data, tokenizer, device, precision, "plain transformers+peft+bitsandbytes")
    write_result(out, {**result, "precision": precision.name})


if __name__ == "__main__":
    main()
