"""A micro-batch's forward and backward replayed as one CUDA graph instead of thousands of launches.

At the recipes' small settings a step is bound by the CPU, not the GPU: TinyLlama 4 x 512 launches about
4,700 kernels a step and the H100 was busy 12% of the wall time (docs/benchmarks.md). A CUDA graph
records the kernels of one micro-batch's forward and backward once per batch shape and replays them
with one call. The optimizer step (whose learning rate and step count change every step) stays eager.

What captured work must not do, and how the engine keeps to it:
- synchronise with the host or take data-dependent shapes: the loss runs every position through the
  head with untrained ones weighted zero (snugtune.loss, fixed_shape; a preference objective adds each
  position to its answer's sum with a fixed-size index_add, preference_loss.group_logps), the token
  count comes from the CPU, and so does a preference batch's count of pairs (`examples` stays a host
  tensor; it is part of the shape's key);
- bake in numbers that change: the loss weights (1 / trained tokens; a preference objective's 1 / pairs,
  ORPO's second term 1 / its tokens) are a tensor filled before each replay, and the fp16 loss scale is
  the GradScaler's own tensor;
- return what it logs only once: a preference objective's metrics (rewards, margins) are the graph's
  output tensors, copied out and added to the step's after each replay;
- replace gradients instead of adding to them: the LoRA gradients exist before capture (one flat
  buffer, zeroed in place), so replays accumulate as eager backward does;
- draw from the random generator (checkpointing cannot restore it inside a graph): only used when no
  block draws any (engine.speedups decides); LoRA dropout draws none, its masks being a hash of a seed
  tensor that the loss advances in place (snugtune.lora_dropout), so each replay draws fresh masks;
- touch host memory: input embeddings kept in host memory (engine.offload.HostEmbedding) are looked up
  before the replay and copied into the graph's input.
The reference forward of DPO (the adapter disabled) is recorded in the same graph as the policy's.
Each shape runs eagerly first (warm-up: compilation, cuBLAS and cuDNN plans); its last eager run is
followed at once by the capture, which only records, and later micro-batches of that shape replay it.
All graphs share one memory pool, held between steps (eager steps hand theirs back): if evaluation then
runs out of memory, the training loop releases the graphs and carries on eagerly.
Shapes past `max_graphs` run eagerly.
"""

from __future__ import annotations

import torch

from snugtune.engine.offload import HostEmbedding
from snugtune.engine.step import forward_backward
from snugtune.objectives import SUPERVISED, Metrics, TrainingObjective, add_metrics

# what the objectives' loss_sums read on the GPU (token_loss_sum; group_logps adds label_groups, and the batch
# may carry reference log-probabilities computed before training)
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seq_lens", "label_groups",
                "reference_logps")
HOST_INPUTS = ("examples",)  # read on the host while the work is recorded (its value is part of the key)


class StepGraphs:
    """Forward + backward of micro-batches as CUDA graphs, one per batch shape.

    `failure` holds why capture failed, after which every micro-batch runs eagerly."""

    def __init__(self, model, device: torch.device, precision, scaler, warmup_runs: int = 2, max_graphs: int = 4,
                 objective: TrainingObjective = SUPERVISED):
        self.model, self.device, self.precision, self.scaler = model, device, precision, scaler
        self.objective = objective
        self.warmup_runs, self.max_graphs = warmup_runs, max_graphs
        cuda = device.type == "cuda"  # elsewhere (the CPU tests) every micro-batch runs the eager warm-up path
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.captures = cuda  # whether shapes past their warm-ups are captured
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.loss_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.runs: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor, Metrics]] = {}
        self.failure: str | None = None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        embedding = inner.get_input_embeddings()
        self.host_embedding = embedding if isinstance(embedding, HostEmbedding) else None

    def _forward_backward(self, inputs: dict[str, torch.Tensor], metrics: Metrics | None = None) -> torch.Tensor:
        return forward_backward(self.model, inputs, self.loss_weight, self.precision, self.scaler,
                                fixed_shape=True, autocast_cache=False, objective=self.objective, metrics=metrics)

    def _set_loss_weights(self, weights: list[float]) -> None:
        """Fill the loss weights' tensor in place (one launch each, no copy from the host); it takes the
        objective's number of terms on the first micro-batch, before anything captures it."""
        shape = (len(weights),) if len(weights) > 1 else ()
        if tuple(self.loss_weight.shape) != shape:
            if self.graphs:
                raise ValueError(f"loss weights for {len(weights)} terms, captured with {self.loss_weight.numel()}")
            self.loss_weight = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for i, weight in enumerate(weights):
            (self.loss_weight[i] if shape else self.loss_weight).fill_(weight)

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_weight: float | list[float],
                         metrics: Metrics | None = None) -> torch.Tensor:
        """Add loss_weight x the gradient of the micro-batch's loss terms (times the fp16 loss scale) to the
        trainable parameters' .grad; returns the terms' sums (sft: the summed token loss, a GPU scalar) and
        adds the objective's metric sums to `metrics`. `batch` is on the CPU; loss_weight one per term."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if self.host_embedding is not None:  # the table lookup runs on the host, outside the graph
            inputs["inputs_embeds"] = self.host_embedding(inputs.pop("input_ids"))
        host = {k: batch[k] for k in HOST_INPUTS if k in batch}
        key = (tuple((k, tuple(v.shape)) for k, v in inputs.items())
               + tuple((k, tuple(v.reshape(-1).tolist())) for k, v in host.items()))
        self._set_loss_weights(list(loss_weight) if isinstance(loss_weight, (list, tuple)) else [loss_weight])
        if key in self.graphs:
            graph, static, loss, outputs = self.graphs[key]
            with torch.no_grad():  # the embeddings' input is a leaf that requires grad
                for k, v in inputs.items():
                    static[k].copy_(v, non_blocking=True)
            graph.replay()
            add_metrics(metrics, {name: (total.clone(), count.clone()) for name, (total, count) in outputs.items()})
            return loss.clone()
        self.runs[key] = self.runs.get(key, 0) + 1
        on_device = {**{k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}, **host}
        if "inputs_embeds" in on_device:  # checkpointed blocks need an input with grad for LoRA's gradients
            on_device["inputs_embeds"].requires_grad_(True)
        capture = (self.captures and self.failure is None and self.runs[key] > self.warmup_runs
                   and len(self.graphs) < self.max_graphs)
        loss = self._eager(on_device, key, metrics)
        if capture:
            if "inputs_embeds" in on_device:  # the eager run's gradient: the capture would record adding to it
                on_device["inputs_embeds"].grad = None
            try:
                self.graphs[key] = self._capture(on_device)
            except Exception as error:  # noqa: BLE001 (any capture failure: run eagerly from now on)
                failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if isinstance(error, torch.OutOfMemoryError):  # free the pool the capture filled
                    self.release(failure)
                self.failure = failure
                if self.stream is not None:
                    torch.cuda.synchronize(self.device)
        return loss

    def _eager(self, on_device: dict[str, torch.Tensor], key: tuple, metrics: Metrics | None = None) -> torch.Tensor:
        """This micro-batch's forward and backward run now, eagerly. Right before a capture it is that shape's
        last warm-up: whatever the micro-batch still compiles or autotunes (a block recompiled after dynamo
        fell back on it, a new kernel's benchmark, which synchronises) happens here, where it may, and the
        capture that follows only records (the Llama-2-7B recipe's capture failed on such an autotune)."""
        if self.stream is None:
            return self._forward_backward(on_device, metrics)
        # on the graphs' stream: work that warms up a shape must run where it will be captured
        if len(self.runs) == 1 and self.runs[key] == 1:
            # blocks cached by the default stream (the probe step) cannot serve this stream: hand them back
            # first, or the step's activations are reserved twice (Llama-3.1-8B without checkpointing: 27 GiB)
            torch.cuda.empty_cache()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            loss = self._forward_backward(on_device, metrics)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return loss

    def release(self, reason: str) -> None:
        """Drop every graph and its memory pool (e.g. evaluation needs the room); eager from then on."""
        self.graphs.clear()
        self.failure = reason
        if self.stream is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _capture(self, static: dict[str, torch.Tensor]):
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise stay reserved beside the graph's pool
        graph = torch.cuda.CUDAGraph()
        outputs: Metrics = {}  # the metrics' tensors the replays refill
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = self._forward_backward(static, outputs)
        return graph, static, loss, outputs
