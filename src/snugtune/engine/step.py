"""One optimizer step, in two halves: every micro-batch's forward and backward, then the optimizer.

The training loop, the probe step, the CUDA-graph capture (engine.graphs records forward_backward itself)
and the benchmarks all run these functions, so a change to the step is made here once. What the loss is
comes in as the objective (snugtune.objectives: sft, dpo, orpo, kto): its loss terms for a micro-batch, and
what each is normalised by over the whole step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from snugtune.engine.distributed import SINGLE, DistContext, full_tensor, sum_across
from snugtune.loss import LossModule
from snugtune.objectives import SUPERVISED, Metrics, TrainingObjective, trained_positions  # noqa: F401 (re-exported)


def forward_backward(model, batch: dict[str, torch.Tensor], loss_weight, precision, scaler, *,
                     fixed_shape: bool = False, offload=None, autocast_cache: bool = True,
                     objective: TrainingObjective = SUPERVISED, metrics: Metrics | None = None) -> torch.Tensor:
    """Add the gradient of the micro-batch's loss terms, each times its loss_weight (times the fp16 loss
    scale), to the trainable parameters' .grad; returns the terms' sums, detached (a scalar where the
    objective has one term: sft's summed token loss). `batch` is on the model's device; the objective's metric sums are added to `metrics`.

    `model` is the model, or a module that returns (loss sum, count) for a batch (DDP / the FSDP root: the
    token loss). `loss_weight` may be a tensor (a CUDA graph fills it before each replay); fixed_shape runs
    every position through the head (engine.graphs); `offload` keeps what backward needs in host memory."""
    wrapped = isinstance(model, (DDP, LossModule))
    with precision.autocast(cache_enabled=autocast_cache), offload or contextlib.nullcontext():
        if wrapped:
            sums = model(batch)[0]
        else:
            sums = objective.loss_sums(model, batch, metrics, fixed_shape)
    scaler.scale((sums * loss_weight).sum()).backward()
    return sums.detach()


def accumulate_gradients(model, group: list[dict[str, torch.Tensor]], precision, scaler, device: torch.device,
                         ctx: DistContext = SINGLE, offload=None, graphs=None, padding: int = 0,
                         objective: TrainingObjective = SUPERVISED, metrics: Metrics | None = None) -> float:
    """Forward/backward every micro-batch of one optimizer step; returns the step's loss (sft: the mean token
    loss), and adds the objective's metric sums to `metrics`.

    Each loss term is normalised by its count over the whole accumulated batch, over all processes (sft: the
    trained tokens; dpo: the pairs; snugtune.objectives), so micro-batch 1 x accumulation 8 gives the same
    gradient as 8 x 1 on variable-length data, and N processes the same as one; DDP and FSDP average
    gradients over processes, the world size turns that back into the sum. Under DDP or FSDP gradients are
    synchronised on the last micro-batch only. `graphs` (engine.graphs.StepGraphs, built for the same
    objective) replays each micro-batch as a CUDA graph (one process). The last `padding` micro-batches run with weight 0
    (engine.distributed.step_share: every process runs the same count)."""
    real = len(group) - padding
    counts = [objective.counts(b) for b in group[:real]]
    # a process whose share is all padding sums as many terms as the rest (counted on a padding batch)
    terms = len(counts[0]) if counts else len(objective.counts(group[0]))
    totals = [max(1, int(sum_across(ctx, sum(c[t] for c in counts)))) for t in range(terms)]
    with precision.autocast():  # what every micro-batch reads (KTO's reference point), without gradient
        state = objective.step_state(model, group[:real], device, lambda value: sum_across(ctx, value))
    step_loss = 0.0
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        weights = [(ctx.world_size if i < real else 0.0) / total for total in totals]
        if graphs is not None:
            sums = graphs.forward_backward(batch, weights, metrics)
        else:
            batch = {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **state}
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP
                model.set_requires_gradient_sync(last)
            weight = weights[0] if len(weights) == 1 else torch.tensor(weights, device=device)
            with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                sums = forward_backward(model, batch, weight, precision, scaler, offload=offload,
                                        objective=objective, metrics=metrics)
        step_loss += sum(float(term) * w for term, w in zip(sums.reshape(-1).tolist(), weights)) / ctx.world_size
    return sum_across(ctx, step_loss)


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    finite: bool


def optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm: float | None, loss: float,
                   loss_scaling: bool) -> StepResult:
    """Unscale, clip, step (a non-finite step is skipped: by the fp16 scaler itself, or here), zero the
    gradients in place (CUDA graphs and the flat LoRA buffer keep them), advance the schedule."""
    scaler.unscale_(optimizer)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))))
    finite = math.isfinite(grad_norm) and math.isfinite(loss)
    if finite or loss_scaling:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=False)
    scheduler.step()
    return StepResult(grad_norm, finite)
