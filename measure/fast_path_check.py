"""Does the engine's fast path compute the same loss and LoRA gradients as plain peft, on the same batch?

One model (the bench's: QLoRA nf4 double quant, LoRA r=16 on all linears, LoRA B drawn small instead of
zero so every gradient is non-trivial), one packed batch of the bench's rows, two passes:
  plain  peft's own LoRA forward, eager blocks, the model's own loss (full-vocabulary logits)
  fast   engine.speedups (fused LoRA layers, compiled blocks) + the engine's chunked loss
On a GPU (or with --bf16 on the CPU) a third pass, plain in fp32 (same 4-bit weights, fp32 compute, no autocast), is the reference:
both bf16 paths are compared with it, and the fast path passes when its largest relative LoRA-gradient
error is within `--margin` times the plain bf16 path's own (bf16 rounding alone makes small gradients
differ by percents; what matters is that the fast path adds no error of its own). On the CPU in fp32 the
two paths are compared directly. Exit 1 on failure.

  python measure/fast_path_check.py --shape llama3-8b --seq 2048     (GPU: bf16 autocast)
  python measure/fast_path_check.py --shape tiny --seq 256           (CPU: fp32)
  python measure/fast_path_check.py --shape smollm2-135m --seq 512 --bf16   (CPU: bf16 vs fp32)
  python measure/fast_path_check.py --shape tinyllama-1.1b --seq 512 --set lora.dropout=0.05
  python measure/fast_path_check.py --shape llama3-8b --seq 12288 --set train.tiled_mlp=true --set train.compile=false
      (the long-row policies of engine.tiling.tile_for_long_rows: MLP tiles, attention by groups of heads,
      lean norms; add --one-document for a causal row without document starts)
  python measure/fast_path_check.py --shape tinyllama-1.1b --seq 512 --set train.precision=fp16 \
      --set train.attention_kernels=sm75     (a T4's path, as `bench --emulate t4` runs it: fp16 autocast with
      a constant loss scale of 2^16 in every pass, every pass on the SDPA kernels a T4 has)

The plain passes attend through transformers' SDPA (a dense block-diagonal mask for packed rows), the fast
path through snugtune.attention (varlen flash attention); with LoRA dropout every pass draws the same
masks (snugtune.lora_dropout: the seed is set to one value before each).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--margin", type=float, default=1.5,
                        help="GPU: the fast path's largest error may be this many times the plain bf16 path's")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="CPU (fp32): largest relative gradient difference accepted")
    parser.add_argument("--bf16", action="store_true", help="on the CPU too: bf16 autocast and the fp32 reference")
    parser.add_argument("--set", action="append", default=[], help="key=value override of the bench config")
    parser.add_argument("--one-document", action="store_true",
                        help="attend the packed row as one causal document (positions 0..n-1, no document starts)")
    args = parser.parse_args()

    from snugtune.bench.compare import bench_config
    from snugtune.bench.plain import attention_kernels
    from snugtune.config import apply_overrides, config_from_dict
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    raw = bench_config(args.shape, args.seq, 1, 1, None, "auto")
    raw["train"]["compile"] = True
    cfg = config_from_dict(apply_overrides(raw, args.set))
    half = torch.float16 if cfg.train.precision == "fp16" else torch.bfloat16
    dtype = half if cuda or args.bf16 else torch.float32
    scale = 2.0**16 if dtype == torch.float16 else 1.0  # fp16 gradients need loss scaling, as GradScaler's start
    with attention_kernels(cfg):  # every pass on the kernels the config allows (sm75: a T4's)
        check(args, cfg, device, dtype, scale)


def check(args, cfg, device: torch.device, dtype: torch.dtype, scale: float) -> None:
    from snugtune.attention import ATTENTION
    from snugtune.data.batches import GPU_PAD_MULTIPLE, collate_micro_batch, micro_batches
    from snugtune.data.prepare import prepare_data
    from snugtune.lora_dropout import lora_dropout_seed
    from snugtune.loss import token_loss_sum
    from snugtune.engine.speedups import apply_speedups
    from snugtune.planner.choose import decisions_for
    from snugtune.planner.inventory import inventory_for
    from snugtune.engine.tiling import tile_for_long_rows
    from snugtune.models.load import decoder_layers, load_base_model, load_tokenizer, prepare_for_training
    from snugtune.models.resolve import resolve_model
    cuda = device.type == "cuda"
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)

    def loaded(compute_dtype: torch.dtype):
        """The bench's model with the same LoRA values every time (seeded init, B drawn small)."""
        base = load_base_model(path, cfg, device, compute_dtype)
        torch.manual_seed(0)
        model = prepare_for_training(base, cfg)
        model.train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        model.set_attn_implementation("sdpa")  # plain: transformers' own attention
        return model

    def same_masks(model) -> None:
        """The dropout seed the fast path's loss reads (it advances the seed once before its forward)."""
        seed = lora_dropout_seed(model)
        if seed is not None:
            seed.fill_(1234)

    model = loaded(dtype)
    # the row packing the most samples among the first 64: document boundaries are what attention must keep
    rows = max(micro_batches(data.train, 1, cfg.train.seed, 0, cfg.max_seq_len)[:64], key=lambda b: len(b[0]))
    batch = collate_micro_batch(rows, tokenizer.pad_token_id, True, GPU_PAD_MULTIPLE if cuda else 1, cfg.max_seq_len)
    batch = {k: v.to(device) for k, v in batch.items() if k != "token_mask"}
    if args.one_document:
        batch.pop("cu_seq_lens", None)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1], device=device).expand_as(batch["input_ids"])
    plain_batch = {k: v for k, v in batch.items() if k != "cu_seq_lens"}
    print(f"{len(rows[0])} samples in the row; document starts: {batch.get('cu_seq_lens')}")

    def gradients(model, loss_of, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.autocast(device.type, dtype=dtype if autocast else torch.float32, enabled=autocast):
            loss = loss_of(model)
        factor = scale if autocast else 1.0
        (loss * factor).backward()
        return float(loss.detach()), {n: p.grad.detach().float().clone() / factor for n, p in model.named_parameters()
                                      if p.requires_grad}

    def fast_loss(model):
        seed = lora_dropout_seed(model)
        if seed is not None:
            seed.fill_(1233)  # token_loss_sum advances it to plain's 1234
        total, n = token_loss_sum(model, batch)
        return total / n

    def plain_loss_of(model):
        same_masks(model)
        return model(**plain_batch).loss

    low = dtype != torch.float32
    plain_loss, plain = gradients(model, plain_loss_of, low)
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation(ATTENTION)
    # what the planner decides for this config as asked, one process on this device
    decisions = decisions_for(cfg, inventory_for(cfg), 1, cfg.train.grad_checkpointing is True,
                              tiled_mlp=cfg.train.tiled_mlp is True, dense_copy=cfg.quant.dense_copy is True, cuda=cuda)
    long_rows = tile_for_long_rows(model, decoder_layers(model), decisions)
    applied = apply_speedups(model, decoder_layers(model), decisions, dtype)
    fast_loss_value, fast = gradients(model, fast_loss, low)
    print(f"{args.shape} seq {args.seq} on {torch.cuda.get_device_name() if cuda else 'cpu'} ({dtype}); "
          f"fast path: {applied}; long-row policies: {long_rows}")
    if applied.cuda_graphs:  # the same micro-batch through engine.graphs: two eager warm-ups, then a replay
        from snugtune.engine.graphs import StepGraphs
        from snugtune.engine.step import trained_positions
        from snugtune.precision import Precision
        graphs = StepGraphs(model, device, Precision("fp16" if dtype == torch.float16 else "bf16", "cuda"),
                            torch.amp.GradScaler("cuda", enabled=False))
        n = trained_positions(batch)
        for run in range(graphs.warmup_runs + 2):
            model.zero_grad(set_to_none=False)
            seed = lora_dropout_seed(model)
            if seed is not None:
                seed.fill_(1233)
            replay_loss = float(graphs.forward_backward({k: v.cpu() for k, v in batch.items()}, scale / n)) / n
        replayed = {name: p.grad.detach().float().clone() / scale for name, p in model.named_parameters()
                    if p.requires_grad}
        error = max(float((replayed[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in fast.items())
        print(f"CUDA graph replay ({len(graphs.graphs)} graph, failure: {graphs.failure}): loss {replay_loss:.6f} "
              f"vs eager fast {fast_loss_value:.6f}; largest relative LoRA-gradient difference {error:.2e}")

    def worst(grads, reference) -> tuple[float, str]:
        return max((float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)), n) for n, g in reference.items())

    if not low:
        error, name = worst(fast, plain)
        print(f"loss: plain {plain_loss:.6f}  fast {fast_loss_value:.6f}")
        print(f"LoRA gradients: {len(plain)} tensors, largest relative difference {error:.2e} ({name}); "
              f"tolerance {args.tolerance:.0e}")
        sys.exit(0 if error <= args.tolerance else 1)
    del model
    if cuda:
        torch.cuda.empty_cache()
    reference_loss, reference = gradients(loaded(torch.float32), plain_loss_of, False)
    plain_error, plain_name = worst(plain, reference)
    fast_error, fast_name = worst(fast, reference)
    low_name = str(dtype).removeprefix("torch.")
    print(f"loss: fp32 reference {reference_loss:.6f}  plain {low_name} {plain_loss:.6f}  fast {low_name} "
          f"{fast_loss_value:.6f}")
    print(f"LoRA gradients ({len(reference)} tensors), largest relative error against fp32: plain {low_name} "
          f"{plain_error:.2e} ({plain_name}), fast {low_name} {fast_error:.2e} ({fast_name}); margin {args.margin}x")
    sys.exit(0 if fast_error <= args.margin * plain_error else 1)


if __name__ == "__main__":
    main()
