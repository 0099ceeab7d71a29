"""LoRA linear layers as one autograd function: frozen matmul + low-rank update, saving only the input.

peft computes a LoRA layer as the base layer (bitsandbytes dequantizes and multiplies), a defensive
copy of its output, then lora_B(lora_A(dropout(x))) * scaling through autocast, about a dozen kernels
and as many saved tensors per layer. Here one function does

    y = x W^T + s (drop(x) A^T) B^T          (W dequantized once per call in the compute dtype, or its dense copy)

and its backward by hand (dequantizing W again instead of keeping it, unless its block may keep it):

    dx = dy W + s (dy B) A        dA = s (dy B)^T drop(x)        dB = s dy^T (drop(x) A^T)

It saves x and the rank-r product drop(x)A^T: nothing of size `out`. Dropout masks come from
snugtune.lora_dropout's counter-based hash, drawn again in backward from the seed's saved value. The
frozen weight is never up-cast and gets no gradient; LoRA masters stay fp32, their gradients too.
Layers it cannot take (DoRA, several adapters, 8-bit bases, merged weights) keep peft's forward.
"""

from __future__ import annotations

import torch

from snugtune.lora_dropout import CountedDropout, keep_mask


def dense_weight(base: torch.nn.Module, dtype: torch.dtype, fresh: bool = False,
                 held: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen weight of a base linear layer as a dense [out, in] tensor in `dtype` (4-bit: dequantized,
    or `held`, its copy dequantized once for the run by engine.dense_copy).

    fresh: dequantize from a flat view of the packed weight. A compiled block otherwise sees the same
    dequantization in forward and backward, merges them and keeps the forward's dense copy alive until
    backward (llama3-8b: 0.41 GiB a block; for every block when none is checkpointed)."""
    if held is not None:
        return held.to(dtype)
    weight = base.weight
    # FSDP's gathered weight is a plain tensor: the 4-bit scales stay on the layer (bitsandbytes' Linear4bit)
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data.view(-1) if fresh else weight.data, state).to(dtype)
    return weight.to(dtype)


@torch.library.custom_op("snugtune::add_product_", mutates_args={"out"})
def _add_product_op(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    out.addmm_(left, right, alpha=alpha)


@_add_product_op.register_fake
def _(out, left, right, alpha) -> None:
    return None


def add_product_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    """out += alpha * left @ right, in place also inside a compiled block.

    Inductor turns a traced `out.addmm_` into an out-of-place addmm that first copies `out` into a new
    buffer (llama3-8b 1 x 2048: 434 device copies, 4.8 ms a step); an opaque op that mutates `out` is
    re-inplaced instead. Eager calls addmm_ directly (a custom op's dispatch costs more than it saves)."""
    if torch.compiler.is_compiling():
        _add_product_op(out, left, right, alpha)
    else:
        out.addmm_(left, right, alpha=alpha)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, dropout, training, keep_dense, dense):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            seed = dropout.seed.clone() if dropout is not None and training else None
            dropped = rows if seed is None else rows * _keep(rows, dropout, seed) * (1.0 / (1.0 - dropout.p))
            low = dropped @ a.t()                                   # [N, r]
            out = rows @ dense_weight(base, dtype, held=dense).t()
            add_product_(out, low, b.t(), scaling)
            if base.bias is not None:
                out += base.bias.to(dtype)
        ctx.save_for_backward(rows, low, lora_a, lora_b, seed, dense)
        ctx.base, ctx.scaling, ctx.dropout, ctx.x_dtype = base, scaling, dropout, x.dtype
        ctx.keep_dense = keep_dense
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, low, lora_a, lora_b, seed, dense = ctx.saved_tensors
        dtype = rows.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_low = grad @ b                                         # [N, r]
        kept = None if seed is None else _keep(rows, ctx.dropout, seed).to(dtype) * (1.0 / (1.0 - ctx.dropout.p))
        dropped = rows if kept is None else rows * kept
        grad_a = (grad_low.t() @ dropped).mul_(ctx.scaling).to(lora_a.dtype)
        grad_b = (grad.t() @ low).mul_(ctx.scaling).to(lora_b.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dense_weight(ctx.base, dtype, fresh=not ctx.keep_dense, held=dense)
            if kept is None:
                add_product_(grad_x, grad_low, a, ctx.scaling)
            else:
                # out of place: inductor (torch 2.13, CPU) computed the in-place add_ with alpha wrongly here
                grad_x = grad_x + (grad_low @ a) * kept * ctx.scaling
            grad_x = grad_x.view(*grad_out.shape[:-1], rows.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


def _keep(rows: torch.Tensor, dropout: CountedDropout, seed: torch.Tensor) -> torch.Tensor:
    return keep_mask(rows.shape[0], rows.shape[1], seed, dropout.key, dropout.p, rows.device)


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
    dropout = module.lora_dropout[adapters[0]] if len(adapters) == 1 and adapters[0] in module.lora_dropout else None
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return False  # a generator-drawn dropout (snugtune.lora_dropout did not replace it): peft's forward
    return (len(adapters) == 1 and adapters[0] in module.lora_A and not module.merged
            and not module.use_dora.get(adapters[0], False) and not module.lora_variant)


def _fused_forward(module, keep_dense: bool, dense: torch.Tensor | None):
    adapter = module.active_adapters[0]
    dropout = module.lora_dropout[adapter]
    dropout = dropout if isinstance(dropout, CountedDropout) and dropout.p > 0 else None
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    base, scaling = module.base_layer, float(module.scaling[adapter])

    def forward(x, *args, **kwargs):
        if module.disable_adapters:  # e.g. peft's disable_adapter() context: base model only
            return base(x, *args, **kwargs)
        # weights read at each call: FSDP swaps in the gathered parameters for the forward
        return _LoraLinear.apply(x, lora_a.weight, lora_b.weight, base, scaling, dropout, module.training,
                                 keep_dense, dense)
    return forward


def fuse_lora_layers(model, keep_dense_in: tuple[torch.nn.Module, ...] = (),
                     dense_copies: dict[int, torch.Tensor] | None = None) -> int:
    """Give every LoRA linear layer of a peft model that this module can take the fused forward (in
    place, on the instances). Returns how many layers were fused.

    keep_dense_in: blocks whose layers may keep their dequantized weights from forward to backward when
    compiled (one dequantization less a step; checkpointed blocks, whose backward follows their
    recomputation one block at a time). Elsewhere backward dequantizes again.
    dense_copies: id(base layer) -> its weight dequantized once for the run (engine.dense_copy); those
    layers multiply by it and never dequantize."""
    keep = {id(m) for block in keep_dense_in for m in block.modules()}
    copies = dense_copies or {}
    fused = 0
    for module in model.modules():
        if _fusable(module):
            module.forward = _fused_forward(module, id(module) in keep, copies.get(id(module.base_layer)))
            fused += 1
    return fused
