"""LoRA dropout whose masks come from a counter-based hash of (seed, layer, element), not a random generator.

peft's LoRA dropout draws from the global generator, so a checkpointed block must save and restore the
generator's state around its recomputation, and a CUDA graph cannot (engine.graphs): every shipped
recipe with dropout then ran without graphs. Here each element's keep/drop decision is a pure function
of three integers, computed with integer tensor ops on the device:

    keep[i] = hash(seed, layer key, i) >= p * 2^32          (hash: two rounds of a 32-bit mixer)

The seed is one int64 tensor shared by every LoRA layer: set from the optimizer step before each step
(start_lora_dropout_step) and advanced in place once per micro-batch (advance_lora_dropout, at the start
of the training loss). The recomputed forward of a checkpointed block reads the same seed and draws the
same mask, a CUDA graph that reads the seed tensor draws fresh masks at every replay, and a resumed run
draws the masks of the uninterrupted one. The run's seed enters through each layer's key. Kept elements are scaled by 1 / (1 - p), as torch.nn.Dropout does.
"""

from __future__ import annotations

import torch

_LOW32 = 0xFFFFFFFF
_CHUNK_ELEMENTS = 1 << 24  # eager runs build the integer hashes (8 bytes an element) this many at a time
_ATTRIBUTE = "snugtune_lora_dropout_seed"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection on 32-bit integers held in int64 (Wellons' lowbias32): each input bit flips about half
    of the output bits. Products may wrap past 2^63; only their low 32 bits are kept."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _LOW32
    return x ^ (x >> 16)


def keep_mask(rows: int, cols: int, seed: torch.Tensor, key: torch.Tensor, p: float,
              device: torch.device | None = None) -> torch.Tensor:
    """[rows, cols] bool, True where an element is kept (probability 1 - p), for seed and layer key (int64
    scalars). The same arguments give the same mask on any call."""
    device = device or seed.device
    seed, key = seed.to(device), key.to(device)
    stream = _mix32((_mix32(seed & _LOW32) + (seed >> 32) * 0x9E3779B9 + key) & _LOW32)
    salt = _mix32(stream ^ 0x5BD1E995)
    threshold = int(p * 2**32)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        index = torch.arange(start * cols, stop * cols, device=device, dtype=torch.int64)
        hashed = _mix32((_mix32((index & _LOW32) ^ stream) + salt + (index >> 32)) & _LOW32)
        mask[start:stop] = (hashed >= threshold).view(stop - start, cols)
    return mask


def drop(x: torch.Tensor, seed: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """x with elements zeroed by keep_mask over its last dimension, the rest scaled by 1 / (1 - p)."""
    mask = keep_mask(x.numel() // x.shape[-1], x.shape[-1], seed, key, p, x.device)
    return x * mask.view(x.shape) * (1.0 / (1.0 - p))


class CountedDropout(torch.nn.Module):
    """Dropout with probability p from keep_mask: a drop-in for the nn.Dropout peft puts before lora_A."""

    def __init__(self, p: float, seed: torch.Tensor, key: torch.Tensor):
        super().__init__()
        self.p = p
        self.seed = seed  # shared by every layer of the model, not a buffer: .to() must not copy it apart
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return drop(x, self.seed, self.key, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def count_lora_dropout(model, seed: int) -> int:
    """Replace the torch.nn.Dropout of every LoRA layer of a peft model with CountedDropout sharing one
    seed tensor (on the LoRA weights' device), each layer's key derived from `seed` (the run's). In place;
    returns how many."""
    from peft.tuners.lora.layer import LoraLayer
    layers = [(m, name) for m in model.modules() if isinstance(m, LoraLayer)
              for name, d in m.lora_dropout.items() if isinstance(d, torch.nn.Dropout) and d.p > 0]
    if not layers:
        return 0
    device = layers[0][0].lora_A[layers[0][1]].weight.device
    state = torch.zeros((), dtype=torch.int64, device=device)
    # the run's seed enters through the layer keys; the shared seed tensor counts steps and micro-batches
    keys = _mix32((torch.arange(len(layers), dtype=torch.int64) * 0x9E3779B9 + (seed & _LOW32)) & _LOW32)
    keys = keys.to(device)
    for i, (module, name) in enumerate(layers):
        module.lora_dropout[name] = CountedDropout(float(module.lora_dropout[name].p), state, keys[i])
    setattr(model, _ATTRIBUTE, state)
    return len(layers)


def start_lora_dropout_step(model, step: int) -> None:
    """Point a model's LoRA dropout at optimizer step `step` (before its micro-batches; each then advances
    it): the masks depend on the step, not on how many micro-batches ran before, so a resumed run draws the
    uninterrupted run's masks."""
    state = lora_dropout_seed(model)
    if state is not None:
        state.fill_(step << 16)


def advance_lora_dropout(model) -> None:
    """Move a model's LoRA dropout on to fresh masks (once per micro-batch, before its forward). In place
    on the device: a CUDA graph that records this call advances the seed at every replay."""
    state = lora_dropout_seed(model)
    if state is not None:
        state.add_(1)


def lora_dropout_seed(model) -> torch.Tensor | None:
    """The seed tensor a model's LoRA dropout reads (count_lora_dropout), or None: filled in place, it
    replays a micro-batch's masks."""
    return getattr(model, _ATTRIBUTE, None)
