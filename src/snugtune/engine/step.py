"""One optimizer step, in two halves: every micro-batch's forward and backward, then the optimizer.

The training loop, the probe step, the CUDA-graph capture (engine.graphs records forward_backward itself)
and the benchmarks all run these functions, so a change to the step is made here once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from snugtune.data.tokenize import IGNORE
from snugtune.engine.distributed import SINGLE, DistContext, full_tensor, sum_across
from snugtune.loss import LossModule, token_loss_sum


def trained_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions the loss scores in a batch (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def forward_backward(model, batch: dict[str, torch.Tensor], loss_weight, precision, scaler, *,
                     fixed_shape: bool = False, offload=None, autocast_cache: bool = True) -> torch.Tensor:
    """Add loss_weight x the gradient of the micro-batch's summed token loss (times the fp16 loss scale) to
    the trainable parameters' .grad; returns the summed loss, detached. `batch` is on the model's device.

    `model` is the model, or a module that returns (loss sum, count) for a batch (DDP / the FSDP root).
    `loss_weight` may be a tensor (a CUDA graph fills it before each replay); fixed_shape runs every
    position through the head (engine.graphs); `offload` keeps what backward needs in host memory."""
    wrapped = isinstance(model, (DDP, LossModule))
    with precision.autocast(cache_enabled=autocast_cache), offload or contextlib.nullcontext():
        loss_sum, _ = model(batch) if wrapped else token_loss_sum(model, batch, fixed_shape=fixed_shape)
    scaler.scale(loss_sum * loss_weight).backward()
    return loss_sum.detach()


def accumulate_gradients(model, group: list[dict[str, torch.Tensor]], precision, scaler, device: torch.device,
                         ctx: DistContext = SINGLE, offload=None, graphs=None, padding: int = 0) -> float:
    """Forward/backward every micro-batch of one optimizer step; returns the step's mean token loss.

    The loss is normalised by the trained tokens of the whole accumulated batch, over all processes, so
    micro-batch 1 x accumulation 8 gives the same gradient as 8 x 1 on variable-length data, and N processes
    the same as one; DDP and FSDP average gradients over processes, the world size turns that back into the
    sum. Under DDP or FSDP gradients are synchronised on the last micro-batch only. `graphs`
    (engine.graphs.StepGraphs) replays each micro-batch as a CUDA graph (one process). The last `padding`
    micro-batches run with weight 0 (engine.distributed.step_share: every process runs the same count)."""
    real = len(group) - padding
    n_scored = max(1, int(sum_across(ctx, sum(trained_positions(b) for b in group[:real]))))
    step_loss = 0.0
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        weight = (ctx.world_size if i < real else 0.0) / n_scored
        if graphs is not None:
            loss_sum = graphs.forward_backward(batch, weight)
        else:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP
                model.set_requires_gradient_sync(last)
            with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                loss_sum = forward_backward(model, batch, weight, precision, scaler, offload=offload)
        step_loss += float(loss_sum) * weight / ctx.world_size
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
