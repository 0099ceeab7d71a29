"""CPU offload for runs larger than the card: checkpointed activations, frozen block weights and the frozen
input-embedding table live in host memory; what a step needs comes to the GPU only when it needs it.

Three small policies, each usable alone, all chosen by the planner (config `offload.*`):

- `ActivationOffload`: a saved-tensor hook around the training forward. What autograd keeps from the
  forward (with checkpointing: every block's input) is copied to pinned host memory on a side stream,
  and copied back when backward reaches it. Recomputation inside backward is not offloaded.
- `WeightStreamer`: each transformer block's frozen weights (4-bit packed or 16-bit; LoRA matrices stay
  on the GPU) live in pinned host memory; a forward pre-hook brings the block's weights to the GPU and
  starts copying the next block's (the next one in the order blocks run: up in forward, down in the
  recomputation of backward), and releases the others. Needs full checkpointing, so that backward
  re-enters each block through its forward.
- `HostEmbedding`: the frozen input-embedding table stays in host memory; each batch's rows are looked up
  there and copied to the GPU (tokens x hidden values instead of the vocab x hidden table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snugtune.models.load import gradients_reach_blocks, quant_states_to

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors are not worth a copy


def _pinned_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())


class ActivationOffload:
    """Context manager: tensors saved for backward on `device_types` move to host memory until used.

    `offloaded_bytes` counts what went out during the last forward."""

    def __init__(self, device_types: tuple[str, ...] = ("cuda",), min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device_types, self.min_bytes = device_types, min_bytes
        self.offloaded_bytes = 0
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type not in self.device_types or size < self.min_bytes:
            return tensor
        host = _pinned_like(tensor)
        if tensor.is_cuda:  # copy on a side stream once the producing kernels are done; keep the memory
            self._stream.wait_stream(torch.cuda.current_stream(tensor.device))  # alive until the copy ends
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self._stream)
        else:
            host.copy_(tensor)
        self.offloaded_bytes += size
        return (host, tensor.device)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, device = packed
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(self._stream)
        return host.to(device, non_blocking=True)

    def __enter__(self):
        self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def resident_parameters(model: torch.nn.Module, layers: torch.nn.ModuleList) -> list[torch.nn.Parameter]:
    """The parameters weight streaming keeps on the device: all but the blocks' frozen weights and a
    HostEmbedding's table."""
    streamed = {id(p) for layer in layers for p in layer.parameters() if not p.requires_grad}
    streamed |= {id(m.weight) for m in model.modules() if isinstance(m, HostEmbedding)}
    return [p for p in model.parameters() if id(p) not in streamed]


@dataclass
class _Block:
    params: list[torch.nn.Parameter]
    home: list[torch.Tensor]                      # host copies, the source of truth
    on_device: list[torch.Tensor] | None = None   # copies on the compute device, while resident
    ready: object = None                          # CUDA event: the copy in has finished


@dataclass
class WeightStreamer:
    """Frozen weights of `layers` kept in host memory; at most the running block and the next one on
    `device`. `fetch_log` lists the block indices in the order their copies were started."""

    layers: torch.nn.ModuleList
    device: torch.device
    blocks: list[_Block] = field(default_factory=list)
    fetch_log: list[int] = field(default_factory=list)
    max_resident: int = 0
    _last: int = -1
    _handles: list = field(default_factory=list)

    def attach(self, model: torch.nn.Module) -> "WeightStreamer":
        """Place `model` (loaded on the CPU): every block's frozen parameters in (pinned) host memory, all
        else — embeddings (unless a HostEmbedding's), head, norms outside blocks, LoRA matrices, buffers, 4-bit
        block scales — on the device; then hook the blocks. Returns self."""
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        quant_states_to(model, self.device)  # bitsandbytes 4-bit scales stay resident
        for p in resident_parameters(model, self.layers):
            p.data = p.data.to(self.device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.device)
        for index, layer in enumerate(self.layers):
            params = [p for p in layer.parameters() if not p.requires_grad]
            home = []
            for p in params:
                host = _pinned_like(p.data)
                host.copy_(p.data)
                home.append(host)
                p.data = host  # the device copy is freed here
            self.blocks.append(_Block(params, home))
            self._handles.append(layer.register_forward_pre_hook(self._before_block(index)))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def detach(self) -> None:
        """Remove the hooks and put every block's weights back on the device."""
        for handle in self._handles:
            handle.remove()
        for index in range(len(self.blocks)):
            self._ensure(index)

    def resident(self) -> list[int]:
        return [i for i, block in enumerate(self.blocks) if block.on_device is not None]

    def _before_block(self, index: int):
        def hook(module, args):
            # forward goes up; the recomputation in backward goes down
            direction = 1 if index == 0 or (index > self._last and index != len(self.blocks) - 1) else -1
            self._last = index
            keep = {index, index + direction}
            for other in self.resident():
                if other not in keep:
                    self._release(other)
            self._ensure(index)
            if 0 <= index + direction < len(self.blocks):
                self._start_copy(index + direction)
            self.max_resident = max(self.max_resident, len(self.resident()))
        return hook

    def _start_copy(self, index: int) -> None:
        block = self.blocks[index]
        if block.on_device is not None:
            return
        self.fetch_log.append(index)
        if self._stream is None:
            block.on_device = [home.to(self.device, copy=True) for home in block.home]
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            block.on_device = [home.to(self.device, non_blocking=True) for home in block.home]
            block.ready = torch.cuda.Event()
            block.ready.record(self._stream)

    def _ensure(self, index: int) -> None:
        self._start_copy(index)
        block = self.blocks[index]
        if block.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(block.ready)
            for tensor in block.on_device:
                tensor.record_stream(torch.cuda.current_stream(self.device))
            block.ready = None
        for p, tensor in zip(block.params, block.on_device):
            p.data = tensor

    def _release(self, index: int) -> None:
        """Point the block back at its host copies; the weights are frozen, so nothing is copied out."""
        block = self.blocks[index]
        for p, home in zip(block.params, block.home):
            p.data = home
        block.on_device, block.ready = None, None


class HostEmbedding(torch.nn.Module):
    """A frozen nn.Embedding whose table lives in host memory: forward gathers the batch's rows on the CPU
    and copies them to `device` (pinned, asynchronous). Llama-3.1-8B: 1 GiB of GPU memory for 16 MB of
    copying per 2,048 tokens."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(embedding.weight.detach().to("cpu"), requires_grad=False)
        self.padding_idx = embedding.padding_idx
        self.device = device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)


def keep_embeddings_on_host(model, device: torch.device) -> bool:
    """Move a causal LM's frozen, untied input embeddings into a HostEmbedding (in place; peft-wrapped or
    not). Returns False, changing nothing, when they are trained or shared with the output head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = inner.get_input_embeddings()
    head = inner.get_output_embeddings()
    if embedding.weight.requires_grad or (head is not None and head.weight is embedding.weight):
        return False
    inner.set_input_embeddings(HostEmbedding(embedding, device))
    if getattr(inner, "is_gradient_checkpointing", False):  # the grad-path hook sat on the old module
        gradients_reach_blocks(inner)
    return True
