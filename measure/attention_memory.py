"""Peak GPU memory and time of one causal attention forward + backward at a long length, per SDPA backend.

  python measure/attention_memory.py [--tokens 98304] [--heads 32] [--kv-heads 8] [--head-dim 128]

At long contexts the recomputed block's backward peaks inside attention's backward: what each kernel
allocates there (fp32 accumulators, grouped-query keys and values expanded to every head) decides the
longest sequence a card trains. "grouped" is tiled attention (snugtune.attention: differentiated one group
of heads at a time). Prints, for each backend that runs: the extra memory above q, k, v and the
output gradient, and the median time of three forward + backward passes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GIB = 2**30


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def _varlen(q, k, v):  # packed rows' attention (snugtune.attention), here one document
    from snugtune.attention import _varlen_attention
    cu = torch.tensor([0, q.shape[2]], dtype=torch.int32, device=q.device)
    return _varlen_attention(q, k, v, cu, None).transpose(1, 2)


def _grouped(q, k, v):
    from types import SimpleNamespace
    from snugtune.attention import attention
    from snugtune.memory_rules import ATTENTION_HEAD_GROUPS
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True,
                             snugtune_head_groups=ATTENTION_HEAD_GROUPS)  # as engine.tiling.tile_attention leaves it
    return attention(module, q, k, v, None, flash=True)[0].transpose(1, 2)


def measure(name, attend, q, k, v, grad):
    times = []
    try:
        for _ in range(3):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = attend(q, k, v)
            out.backward(grad)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() - base
            del out
            q.grad = k.grad = v.grad = None
    except Exception as exc:  # a backend that cannot run this shape says why
        print(f"{name:>10}: does not run ({str(exc).splitlines()[0][:100]})")
        return
    print(f"{name:>10}: peak above inputs {peak / GIB:6.2f} GiB, forward + backward {sorted(times)[1] * 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=98304)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    shape = (1, args.tokens, args.heads, args.head_dim)
    # [B, H, L, D] views of [B, L, H, D] tensors, as transformers' attention receives them
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k, v = (torch.randn(shape[0], shape[1], args.kv_heads, shape[3], device="cuda", dtype=torch.bfloat16)
            .transpose(1, 2).requires_grad_(True) for _ in range(2))
    grad = torch.randn_like(q)
    print(f"{args.tokens} tokens, {args.heads} heads ({args.kv_heads} for keys and values) of {args.head_dim}; "
          f"q is {q.numel() * 2 / GIB:.2f} GiB; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        measure(name, _sdpa(backend), q, k, v, grad)
    measure("varlen", _varlen, q, k, v, grad)
    measure("grouped", _grouped, q, k, v, grad)  # engine.tiling.tile_attention's attention
    measure("default", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            q, k, v, grad)


if __name__ == "__main__":
    main()
