"""quant.dense_copy: a 16-bit copy of the frozen 4-bit block weights, dequantized once when the model is built.

bitsandbytes dequantizes a 4-bit weight every time a layer multiplies by it (forward, recomputed forward,
backward): on an H200, Llama-3.1-8B's 7 billion block weights take 8 ms a pass. With a dense copy held on
the GPU the steps multiply by the same values without dequantizing; the cost is 2 bytes a weight (13 GiB
there), so the planner holds one only where the run fits with it (planner.choose)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snugtune.engine.fused_lora import dense_weight


def four_bit_linears(layers) -> list[torch.nn.Linear]:
    """The bitsandbytes 4-bit linear layers inside the transformer blocks `layers`."""
    return [m for block in layers for m in block.modules()
            if isinstance(m, torch.nn.Linear) and getattr(m.weight, "quant_state", None) is not None]


def hold_dense_copies(layers, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Dequantize every 4-bit linear in `layers` once, in `dtype`, and make each layer's own forward multiply
    by its copy (for the layers LoRA does not wrap, or wraps without the fused forward). Returns
    id(layer) -> its copy, for fused_lora.fuse_lora_layers."""
    copies = {}
    for linear in four_bit_linears(layers):
        with torch.no_grad():
            copies[id(linear)] = dense_weight(linear, dtype).contiguous()
        linear.forward = _dense_forward(linear, copies[id(linear)])
    return copies


def _dense_forward(linear: torch.nn.Linear, dense: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:  # as bitsandbytes' Linear4bit: computes in the copy's dtype
        bias = None if linear.bias is None else linear.bias.to(dense.dtype)
        return F.linear(x.to(dense.dtype), dense, bias).to(x.dtype)
    return forward
