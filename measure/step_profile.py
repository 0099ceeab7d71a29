"""Where a training step's time goes, and what each engine change buys, in one process on one model.

Loads the bench's model once (QLoRA nf4 double quant, LoRA r=16 on all linears, AdamW 8-bit, the
bench's packed rows), then runs the same steps under each variant and prints tokens/s (median of the
warm steps) and peak allocated memory per variant. Variants are '+'-joined features:

  base      snugtune's engine as `train` runs it today (peft LoRA, reentrant checkpointing, chunked loss)
  fused     engine.fused_lora: each LoRA linear as one autograd function
  compile   each decoder block compiled with torch.compile
  liger     Liger's RMSNorm, RoPE and SwiGLU kernels (applied last: cannot be undone)
  nockpt    no gradient checkpointing
  torchadam torch's fused AdamW (fp32 moments) instead of the config's AdamW 8-bit
  hostembed the input embeddings in host memory (engine.offload.HostEmbedding; applied for the rest of the run)
  actoffload checkpointed block inputs offloaded to pinned host memory (engine.offload.ActivationOffload)
  graphs    each micro-batch's forward and backward replayed as a CUDA graph (engine.graphs; needs lora dropout 0)

The LoRA matrices are one flat optimizer tensor, as `train` makes them. A profiled variant also prints how
much of the wall time the GPU was busy (sum of kernel times) and the operators with the most CPU time.

  python measure/step_profile.py --shape llama3-8b --seq 2048 --variants base,fused,fused+compile \
      --profile base,fused --out $OUT/profile.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="base,fused")
    parser.add_argument("--profile", default="", help="variants to profile (2 steps each)")
    parser.add_argument("--out", default=None, help="file for the profiler tables")
    args = parser.parse_args()

    from peft.tuners.lora.layer import LoraLayer

    from snugtune.bench.compare import bench_config
    from snugtune.config import config_from_dict
    from snugtune.data.batches import GPU_PAD_MULTIPLE, collate_micro_batch, micro_batches, real_tokens
    from snugtune.data.prepare import prepare_data
    from snugtune.engine.fused_lora import fuse_lora_layers
    from snugtune.engine.graphs import StepGraphs
    from snugtune.engine.step import forward_backward, trained_positions
    from snugtune.precision import Precision
    from snugtune.engine.offload import ActivationOffload, keep_embeddings_on_host
    from snugtune.engine.optim import build_optimizer, flatten_trainable
    from snugtune.models.load import decoder_layers, load_base_model, load_tokenizer, prepare_for_training
    from snugtune.models.resolve import resolve_model

    cfg = config_from_dict(bench_config(args.shape, args.seq, args.batch, args.steps, None, "auto"))
    device = torch.device("cuda", 0)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = prepare_for_training(load_base_model(path, cfg, device, torch.bfloat16), cfg)
    model.train()
    layers = list(decoder_layers(model))
    params = [flatten_trainable([p for p in model.parameters() if p.requires_grad])]
    optimizer = build_optimizer(params, cfg.train, device)
    batches = micro_batches(data.train, cfg.train.micro_batch, cfg.train.seed, 0, cfg.max_seq_len)
    print(f"loaded: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
    torch._dynamo.config.cache_size_limit = 64

    optimizer_seconds: list[float] = []
    offload = graphs = None
    bf16 = Precision("bf16", "cuda")
    no_scaling = bf16.grad_scaler()

    def step(i: int) -> int:
        batch = collate_micro_batch(batches[i % len(batches)], tokenizer.pad_token_id, True, GPU_PAD_MULTIPLE, cfg.max_seq_len)
        tokens = real_tokens(batch)
        if graphs is not None:
            graphs.forward_backward(batch, 1 / trained_positions(batch))
        else:
            batch = {k: v.to(device) for k, v in batch.items() if k != "token_mask"}
            forward_backward(model, batch, 1 / trained_positions(batch), bf16, no_scaling, offload=offload)
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        optimizer_seconds.append(time.perf_counter() - start)
        return tokens

    def configure(features: set[str]) -> None:
        nonlocal optimizer, offload, graphs
        offload = ActivationOffload() if "actoffload" in features else None
        graphs = StepGraphs(model, device, bf16, no_scaling) \
            if "graphs" in features else None
        if "hostembed" in features and not getattr(model, "_host_embeddings", False):
            model._host_embeddings = keep_embeddings_on_host(model, device)
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, fused=True) if "torchadam" in features \
            else build_optimizer(params, cfg.train, device)
        for module in model.modules():
            if isinstance(module, LoraLayer):  # fuse_lora_layers sets an instance forward: back to peft's
                module.__dict__.pop("forward", None)
        if "fused" in features:
            fuse_lora_layers(model)
        for layer in layers:
            layer.gradient_checkpointing = "nockpt" not in features
            layer._compiled_call_impl = None
            if "compile" in features:
                layer.compile()
        if "liger" in features and not getattr(model, "_liger_done", False):
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=model.get_base_model())
            model._liger_done = True

    report = open(args.out, "w") if args.out else None

    def say(text: str) -> None:
        print(text, flush=True)
        if report:
            report.write(text + "\n")
            report.flush()

    for variant in args.variants.split(","):
        configure(set(variant.split("+")))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        speeds, times = [], []
        optimizer_seconds.clear()
        try:
            for i in range(args.steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                tokens = step(i)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                speeds.append(tokens / times[-1])
        except torch.OutOfMemoryError:
            say(f"{variant}: out of memory")
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        warm = speeds[2:] or speeds
        line = (f"{variant:28s} {statistics.median(warm):9,.0f} tok/s  step {statistics.median(times[2:] or times):.3f} s"
                f"  first {times[0]:.1f} s  clip+optimizer {statistics.median(optimizer_seconds) * 1e3:.1f} ms"
                f"  peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        say(line)
        if variant in args.profile.split(","):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(2):
                    step(i)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
            averages = prof.key_averages()
            kernels = sum(e.self_device_time_total for e in averages if getattr(getattr(e, "device_type", None), "name", "") == "CUDA") / 1e6
            say(f"=== profile {variant} (2 steps): wall {wall:.3f} s, GPU kernels {kernels:.3f} s "
                f"({kernels / wall:.0%} busy)")
            say(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
            say(averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
