"""Data parallelism through torch.distributed (torchrun sets the environment; PyTorch's DDP or FSDP does
the communication). One process per GPU (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from snugtune.errors import AnotherProcessFailed, UserError
from snugtune.loss import LossModule


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()  # one process


def context_from_env(environ=os.environ) -> DistContext:
    """The launcher's contract (torchrun / accelerate): RANK, WORLD_SIZE, LOCAL_RANK."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", "0")))


def start(ctx: DistContext, device: torch.device, timeout_s: float) -> None:
    """Join the process group: NCCL on GPUs, gloo on the CPU. A collective (the start included) that waits
    longer than timeout_s for the others fails: gloo raises, NCCL's watchdog ends the process."""
    if ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))


@contextlib.contextmanager
def failures_named(ctx: DistContext, timeout_s: float):
    """Inside: a collective that failed because another process died (its connections closed) or did not
    answer within timeout_s becomes AnotherProcessFailed, one line, instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        if not (ctx.enabled and collective_failed(exc)):
            raise
        cause = re.sub(r"^\[[^]]*\] ", "", " ".join(str(exc).split()))[:300]  # without gloo's source file
        raise AnotherProcessFailed(
            f"process {ctx.rank} of {ctx.world_size}: another process of this run failed or did not answer "
            f"within train.collective_timeout_s={timeout_s:g} s ({cause}); its own output says why; run the "
            f"same command to resume from the last checkpoint") from None


def collective_failed(exc: BaseException) -> bool:
    """Whether an error is torch.distributed's (NCCL, the rendezvous store) or gloo's transport giving up on
    a peer (gloo raises plain RuntimeErrors naming its source file)."""
    return isinstance(exc, dist.DistError) or "gloo/transport" in str(exc)


def stop(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(ctx: DistContext, value: float) -> float:
    """Sum a number over all processes (for token counts and logged losses)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def max_across(ctx: DistContext, value: int) -> int:
    """The largest of an integer over all processes (collective: every process must call it)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agree_on_checkpoint(ctx: DistContext, checkpoint: Path | None, run_dir: Path) -> None:
    """Check that every process resumes from the same checkpoint (collective: all call it). Process 0 alone
    writes them, so on several machines the others see them only where output_dir is shared storage."""
    mark = zlib.crc32(checkpoint.name.encode()) if checkpoint else -1
    if max_across(ctx, mark) != -max_across(ctx, -mark):
        raise UserError(f"{run_dir}: the processes of this run find different checkpoints there (process "
                        f"{ctx.rank}: {checkpoint.name if checkpoint else 'none'}); process 0 alone writes them, "
                        f"so output_dir must be one folder every machine sees (the same path on shared storage)")


def step_share(step_rows: list, ctx: DistContext, micro_batch: int) -> tuple[list[list], int]:
    """This process's micro-batches of one optimizer step's rows (rows r, r+N, ... of N processes), and how
    many of them, at the end, are padding to run with weight 0.

    Every process runs the same number of micro-batches, so the collectives inside each forward and
    backward (FSDP's gathers, DDP's gradient sync on the last one) pair up at an epoch's tail too, where
    the rows do not split evenly: a process short of rows runs the step's first row again, weighted 0.
    """
    mine = step_rows[ctx.rank::ctx.world_size]
    count = math.ceil(math.ceil(len(step_rows) / ctx.world_size) / micro_batch)  # the fullest process's
    batches = [mine[k:k + micro_batch] for k in range(0, len(mine), micro_batch)]
    padding = count - len(batches)
    return batches + [step_rows[:1]] * padding, padding


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard_with_fsdp(model: torch.nn.Module, layers: torch.nn.ModuleList, loss_fn) -> torch.nn.Module:
    """PyTorch FSDP (fully_shard): every transformer block is a unit, gathered just before it runs and
    resharded after; the root unit (embeddings, final norm, head) wraps the model and our loss, so its
    parameters are gathered for the whole forward. Returns the root: call it with a batch for the loss."""
    from torch.distributed.fsdp import fully_shard
    for layer in layers:
        fully_shard(layer)
    root = LossModule(model, loss_fn)
    fully_shard(root)
    return root


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP) one; a plain tensor as it is. Collective for sharded ones:
    every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `param` is: sharded the same way when param is sharded (FSDP)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor.to(param.device)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of a tensor (its shard, for FSDP)."""
    from torch.distributed.tensor import DTensor
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
