"""Attention for training rows without dense masks: causal SDPA for rows of one document, variable-length
flash attention for rows packing several.

transformers' SDPA path turns packed rows (restarting position ids) into a dense [L, L] block-diagonal
mask, which takes SDPA off its flash kernel (Llama-3.1-8B shape, 1 x 4096 on an H200: -17%) and costs
O(L^2) memory; and while a CUDA graph is being captured it builds a dense causal mask even for rows of
one document (it cannot look at the data then), so the captured step ran a different attention, and
a different compiled block, than its eager warm-up (the capture then failed).

Here the model's attention is this module's function, under the name ATTENTION:
- the mask function returns no mask unless the batch carries a padding mask (then transformers' own);
- with no mask and no document boundaries: SDPA with is_causal (flash / cuDNN kernels);
- with boundaries (cu_seq_lens, from data.batches.collate_packed: each document's start in the rows
  laid end to end, padded with the total to a fixed length): torch.nn.attention.varlen.varlen_attn on a
  GPU that has it (compute capability 8.0 or newer, fp16/bf16), else SDPA with a block-diagonal mask
  built from the boundaries on the device (T4s, the CPU). Either way no host synchronisation.

For long rows in blocks that run eagerly (engine.tiling.tile_attention), attention (causal, or per document
for packed rows) runs over groups of heads: its backward recomputes one group's forward at a time and
differentiates it alone. The flash kernels' backward holds an fp32 query-gradient accumulator and the keys'
and values' gradients expanded to every query head: 3 GiB at 98,304 tokens of Llama-3.1-8B (32 heads, 8 for
keys and values), an eighth of that per group of 4 query heads; for one more attention forward.

`train.attention_kernels: sm75` limits training to the kernels a T4 has (SM75_BACKENDS: no flash, no cuDNN, no
varlen), so any GPU runs a T4's attention path (`snugtune bench --emulate t4`).
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from snugtune.memory_rules import head_group_count

ATTENTION = "snugtune_attention"
SM75_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # SDPA's kernels on compute capability 7.5

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
# read once here: inspect cannot run inside a compiled block
_VARLEN_OPTIONS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def varlen_usable(device: torch.device, kernels: str = "auto") -> bool:
    """Whether varlen flash attention runs on `device`: a CUDA GPU of compute capability >= 8.0 and a
    torch that has it (half precision is checked per call), where train.attention_kernels allows flash."""
    return (kernels == "auto" and device.type == "cuda" and varlen_attn is not None
            and torch.cuda.get_device_capability(device) >= (8, 0))


def _within_sm75(attend, *tensors):
    """attend() on the SDPA kernels a T4 has."""
    with sdpa_kernel(SM75_BACKENDS):
        return attend(*tensors)


def document_mask(cu_seq_lens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, 1, length, length] bool: position q sees k when both are in one document and k <= q."""
    positions = torch.arange(batch * length, device=cu_seq_lens.device)
    document = (torch.searchsorted(cu_seq_lens, positions, right=True) - 1).view(batch, length)
    same = document[:, :, None] == document[:, None, :]
    return (same & torch.ones(length, length, dtype=torch.bool, device=same.device).tril())[:, None]


def _varlen_attention(query, key, value, cu_seq_lens, scaling):
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    options = {"scale": scaling}
    if k.shape[1] != heads:  # grouped-query attention: each key/value head serves heads // kv_heads queries
        if "enable_gqa" in _VARLEN_OPTIONS:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if "is_causal" in _VARLEN_OPTIONS:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)  # causal: no keys after the query
    cu = cu_seq_lens.to(torch.int32)
    out = varlen_attn(q, k, v, cu, cu, length, length, **options)
    return out.view(batch, length, heads, dim)


def head_groups(heads: int, kv_heads: int, most: int) -> list[tuple[slice, slice]]:
    """(query heads, key/value heads) of each of memory_rules.head_group_count(kv_heads, most) groups: whole
    key/value heads and the query heads that share them."""
    count = head_group_count(kv_heads, most)
    q, kv = heads // count, kv_heads // count
    return [(slice(g * q, (g + 1) * q), slice(g * kv, (g + 1) * kv)) for g in range(count)]


class _HeadGroupedAttention(torch.autograd.Function):
    """`attend` (query [B, h, L, D], key/value [B, h_kv, L, D] -> [B, L, h, D]) computed and differentiated
    one group of heads at a time (head_groups); keeps only query, key and value for backward, which recomputes
    each group under the forward's autocast (as torch.utils.checkpoint does): query and key may reach attention
    in fp32 (rotary in the fp32 residual stream of a full run) beside a bf16 value, which only
    autocast brings to one dtype."""

    @staticmethod
    def forward(ctx, query, key, value, attend, groups):
        batch, heads, length, dim = query.shape
        out = query.new_empty(batch, length, heads, dim)  # the layout the attention interface returns
        for qh, kh in groups:
            out[:, :, qh] = attend(query[:, qh], key[:, kh], value[:, kh])
        ctx.save_for_backward(query, key, value)
        ctx.attend, ctx.groups = attend, groups
        device = query.device.type
        ctx.autocast = {"device_type": device, "enabled": torch.is_autocast_enabled(device),
                        "dtype": torch.get_autocast_dtype(device), "cache_enabled": torch.is_autocast_cache_enabled()}
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (query, key, value)]
        for qh, kh in ctx.groups:
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                parts = [t.detach().requires_grad_(True) for t in (query[:, qh], key[:, kh], value[:, kh])]
                got = torch.autograd.grad(ctx.attend(*parts), parts, grad_out[:, :, qh])
            for grad, part, heads in zip(grads, got, (qh, kh, kh)):
                grad[:, heads] = part
        return *grads, None, None


def _attend(module, query, key, value, attention_mask, cu_seq_lens, flash: bool, dropout: float,
            scaling: float | None, **kwargs) -> torch.Tensor:
    """One attention call over the heads given: [B, L, h, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if cu_seq_lens is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)[0]
    if flash:
        return _varlen_attention(query, key, value, cu_seq_lens, scaling)
    mask = document_mask(cu_seq_lens, query.shape[0], query.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)[0]


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              flash: bool = False, kernels: str = "auto", **kwargs):
    """transformers' attention interface: query [B, H, L, D], key/value [B, H_kv, L, D]; returns
    ([B, L, H, D], None). flash: varlen_usable() held for the training device. kernels: train.attention_kernels
    (sm75: SM75_BACKENDS only). A module with `snugtune_head_groups` (engine.tiling.tile_attention) attends a
    group of heads at a time in training."""
    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    flash = flash and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
    attend = partial(_attend, module, attention_mask=attention_mask, cu_seq_lens=cu_seq_lens, flash=flash,
                     dropout=dropout, scaling=scaling, **kwargs)
    if kernels == "sm75":
        attend = partial(_within_sm75, attend)
    groups = head_groups(query.shape[1], key.shape[1], getattr(module, "snugtune_head_groups", 1))
    if (attention_mask is None and len(groups) > 1 and dropout == 0.0 and query.shape[2] == key.shape[2]
            and torch.is_grad_enabled()):
        return _HeadGroupedAttention.apply(query, key, value, attend, groups), None
    return attend(query, key, value), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask where transformers' SDPA would build one from position ids alone; its own otherwise."""
    from transformers.masking_utils import sdpa_mask
    if attention_mask is None and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_document_attention(model, device: torch.device, kernels: str = "auto") -> bool:
    """Switch a transformers causal LM that will train on `device` to this module's attention, where it
    dispatches through transformers' attention interface and attends over the whole row (no sliding
    window), on the kernels train.attention_kernels allows. In place; returns whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    config = model.config
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if not getattr(model, "_supports_attention_backend", False) or windowed \
            or config._attn_implementation not in ("sdpa", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, partial(attention, flash=varlen_usable(device, kernels), kernels=kernels))
    AttentionMaskInterface.register(ATTENTION, _mask)
    model.set_attn_implementation(ATTENTION)
    return True
