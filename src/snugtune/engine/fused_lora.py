"""LoRA linear layers as one autograd function: frozen matmul + low-rank update, saving only the input.

peft computes a LoRA layer as the base layer (bitsandbytes dequantizes and multiplies), a defensive
copy of its output, then lora_B(lora_A(dropout(x))) * scaling through autocast, about a dozen kernels
and as many saved tensors per layer. Here one function does

    y = x W^T + s (drop(x) A^T) B^T          (W dequantized once per call, in the compute dtype)

and its backward by hand (dequantizing W again instead of keeping it, unless its block may keep it):

    dx = dy W + s (dy B) A        dA = s (dy B)^T drop(x)        dB = s dy^T (drop(x) A^T)

It saves x, the rank-r product drop(x)A^T and (with dropout) the mask: nothing of size `out`. The
frozen weight is never up-cast and gets no gradient; LoRA masters stay fp32, their gradients too.
Layers it cannot take (DoRA, several adapters, 8-bit bases, merged weights) keep peft's forward.
"""

from __future__ import annotations

import torch


def dense_weight(base: torch.nn.Module, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
    """The frozen weight of a base linear layer as a dense [out, in] tensor in `dtype` (4-bit: dequantized).

    fresh: dequantize from a flat view of the packed weight. A compiled block otherwise sees the same
    dequantization in forward and backward, merges them and keeps the forward's dense copy alive until
    backward (llama3-8b: 0.41 GiB a block; for every block when none is checkpointed)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data.view(-1) if fresh else weight.data, state).to(dtype)
    return weight.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, dropout_p, training, keep_dense):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            mask = None
            dropped = rows
            if dropout_p > 0 and training:
                mask = torch.empty_like(rows).bernoulli_(1 - dropout_p).to(torch.bool)
                dropped = rows * mask / (1 - dropout_p)
            low = dropped @ a.t()                                   # [N, r]
            out = rows @ dense_weight(base, dtype).t()
            out.addmm_(low, b.t(), alpha=scaling)
            if base.bias is not None:
                out += base.bias.to(dtype)
        ctx.save_for_backward(rows, low, lora_a, lora_b, mask)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.x_dtype = base, scaling, dropout_p, x.dtype
        ctx.keep_dense = keep_dense
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, low, lora_a, lora_b, mask = ctx.saved_tensors
        dtype = rows.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_low = grad @ b                                         # [N, r]
        dropped = rows if mask is None else rows * mask / (1 - ctx.dropout_p)
        grad_a = (grad_low.t() @ dropped).mul_(ctx.scaling).to(lora_a.dtype)
        grad_b = (grad.t() @ low).mul_(ctx.scaling).to(lora_b.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(ctx.base, dtype, fresh=not ctx.keep_dense)
            if mask is None:
                grad_x.addmm_(grad_low, a, alpha=ctx.scaling)
            else:
                grad_x.add_((grad_low @ a) * mask, alpha=ctx.scaling / (1 - ctx.dropout_p))
            grad_x = grad_x.view(*grad_out.shape[:-1], rows.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _fusable(module) -> bool:
    from peft.tuners.lora.layer import LoraLayer
    base = getattr(module, "base_layer", None)
    if not isinstance(module, LoraLayer) or not isinstance(base, torch.nn.Linear):  # bnb's layers are Linears
        return False
    weight = base.weight
    packed = getattr(weight, "quant_state", None) is not None
    if not packed and not weight.is_floating_point():
        return False  # LLM.int8 bases keep bitsandbytes' own matmul
    adapters = list(module.active_adapters)
    return (len(adapters) == 1 and adapters[0] in module.lora_A and not module.merged
            and not module.use_dora.get(adapters[0], False) and not module.lora_variant)


def _fused_forward(module, keep_dense: bool):
    adapter = module.active_adapters[0]
    dropout = module.lora_dropout[adapter]
    dropout_p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    base, scaling = module.base_layer, float(module.scaling[adapter])

    def forward(x, *args, **kwargs):
        if module.disable_adapters:  # e.g. peft's disable_adapter() context: base model only
            return base(x, *args, **kwargs)
        return _LoraLinear.apply(x, lora_a, lora_b, base, scaling, dropout_p, module.training, keep_dense)
    return forward


def fuse_lora_layers(model, keep_dense_in: tuple[torch.nn.Module, ...] = ()) -> int:
    """Give every LoRA linear layer of a peft model that this module can take the fused forward (in
    place, on the instances). Returns how many layers were fused.

    keep_dense_in: blocks whose layers may keep their dequantized weights from forward to backward when
    compiled (one dequantization less a step; checkpointed blocks, whose backward follows their
    recomputation one block at a time). Elsewhere backward dequantizes again."""
    keep = {id(m) for block in keep_dense_in for m in block.modules()}
    fused = 0
    for module in model.modules():
        if _fusable(module):
            module.forward = _fused_forward(module, id(module) in keep)
            module.snugtune_fused = True
            fused += 1
    return fused


def unfuse_lora_layers(model) -> None:
    """Back to peft's own forward (before merging or saving through peft's other paths)."""
    for module in model.modules():
        if module.__dict__.pop("snugtune_fused", False):
            del module.forward
