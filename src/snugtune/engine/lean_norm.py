"""RMSNorm that keeps only its 16-bit input for backward, for blocks that run eagerly at long contexts.

transformers' Llama-family RMSNorm casts its input to fp32, and autograd keeps that copy for backward;
forward also holds two more fp32 tensors of the input's size at once. At 98,304 tokens of a 4096-wide
model one fp32 copy is 1.5 GiB, two norms a block: in the block that backward recomputes, the peak of a
long-context step. This norm computes the same expression a slice of rows at a time (each row's mean is
its own, so the output is bit-identical), keeps its 16-bit input and one fp32 value a row, and in
backward recomputes the normalised rows, again a slice at a time.

Compiled blocks keep transformers' norm: inductor fuses it and chooses what to save itself.
"""

from __future__ import annotations

import torch

from snugtune.memory_rules import LEAN_NORMS

ROWS_AT_ONCE = 8192   # rows normalised per slice: fp32 temporaries of ROWS_AT_ONCE x hidden at a time


def _slices(rows: int) -> list[slice]:
    return [slice(start, start + ROWS_AT_ONCE) for start in range(0, rows, ROWS_AT_ONCE)]


def _inverse_rms(rows: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + eps)


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows, dtype=torch.result_type(weight, rows))
        inverse = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
        for at in _slices(rows.shape[0]):
            inverse[at] = _inverse_rms(rows[at], eps)
            out[at] = weight * (rows[at].float() * inverse[at]).to(x.dtype)
        ctx.save_for_backward(x, weight, inverse)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, inverse = ctx.saved_tensors
        rows, grads = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, x.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for at in _slices(rows.shape[0]):
            normed = rows[at].float() * inverse[at]
            grad_normed = (grads[at] * weight).float()
            if grad_x is not None:
                mean = (grad_normed * normed).mean(-1, keepdim=True)
                grad_x[at] = inverse[at] * (grad_normed - normed * mean)
            if grad_weight is not None:
                grad_weight += (grads[at].float() * normed.to(x.dtype)).sum(0)
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        return grad_x, grad_weight.to(weight.dtype) if grad_weight is not None else None, None


def _lean_forward(norm: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _LeanRMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    return forward


def lean_norms(model: torch.nn.Module) -> int:
    """Give every norm of the model's LEAN_NORMS class (memory_rules: the transformers classes whose forward is
    `weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)`) the lean forward, in place. Returns how many."""
    wanted = LEAN_NORMS.get(model.config.model_type)
    leaned = 0
    for module in model.modules():
        if type(module).__name__ == wanted and "forward" not in module.__dict__:
            module.forward = _lean_forward(module)
            leaned += 1
    return leaned
