"""Does the engine's fast path compute the same loss and LoRA gradients as plain peft, on the same batch?

One model (the bench's: QLoRA nf4 double quant, LoRA r=16 on all linears, LoRA B drawn small instead of
zero so every gradient is non-trivial), one packed batch of the bench's rows, two passes:
  plain  peft's own LoRA forward, eager blocks, the model's own loss (full-vocabulary logits)
  fast   engine.speedups (fused LoRA layers, compiled blocks) + the engine's chunked loss
Prints both losses and, per LoRA tensor, |g_fast - g_plain| / |g_plain|; exit 1 beyond tolerance.

  python benchmarks/fast_path_check.py --shape llama3-8b --seq 2048     (GPU: bf16 autocast)
  python benchmarks/fast_path_check.py --shape tiny --seq 256           (CPU: fp32)
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative gradient difference accepted (default: 2e-2 in bf16, 1e-4 in fp32)")
    args = parser.parse_args()

    from snugtune.bench import bench_config
    from snugtune.config import config_from_dict
    from snugtune.data import GPU_PAD_MULTIPLE, collate_micro_batch, micro_batches, prepare_data
    from snugtune.engine.fused_lora import unfuse_lora_layers
    from snugtune.engine.loss import token_loss_sum
    from snugtune.engine.speedups import apply_speedups
    from snugtune.models import decoder_layers, load_base_model, load_tokenizer, prepare_for_training, resolve_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tolerance = args.tolerance or (2e-2 if cuda else 1e-4)
    raw = bench_config(args.shape, args.seq, 1, 1, None, "auto")
    raw["train"]["compile"] = True
    cfg = config_from_dict(raw)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    model = prepare_for_training(load_base_model(path, cfg, device, dtype), cfg)
    model.train()
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    rows = micro_batches(data.train, 1, cfg.train.seed, 0, cfg.max_seq_len)[0]
    batch = collate_micro_batch(rows, tokenizer.pad_token_id, True, GPU_PAD_MULTIPLE if cuda else 1)
    batch = {k: v.to(device) for k, v in batch.items() if k != "token_mask"}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def gradients(loss_of) -> tuple[float, dict[str, torch.Tensor]]:
        for p in lora.values():
            p.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = loss_of()
        loss.backward()
        return float(loss.detach()), {n: p.grad.detach().float().clone() for n, p in lora.items()}

    plain_loss, plain = gradients(lambda: model(**batch).loss)
    applied = apply_speedups(model, decoder_layers(model), cfg, device)

    def fast_loss():
        total, n = token_loss_sum(model, batch)
        return total / n
    fast_loss_value, fast = gradients(fast_loss)
    unfuse_lora_layers(model)
    worst_name, worst = max(((n, float((fast[n] - g).norm() / g.norm().clamp_min(1e-30))) for n, g in plain.items()),
                            key=lambda item: item[1])
    print(f"{args.shape} seq {args.seq} on {torch.cuda.get_device_name() if cuda else 'cpu'} ({dtype}); "
          f"fast path: {applied}")
    print(f"loss: plain {plain_loss:.6f}  fast {fast_loss_value:.6f}  (difference {abs(plain_loss - fast_loss_value):.2e})")
    print(f"LoRA gradients: {len(plain)} tensors, largest relative difference {worst:.2e} ({worst_name}); "
          f"tolerance {tolerance:.0e}")
    sys.exit(0 if worst <= tolerance else 1)


if __name__ == "__main__":
    main()
