"""Fitting the card: a probe step before training, and after an out-of-memory error the planner's next plan.

The planner decides every step down (planner.apply.step_down); here it is carried out, in one place: in
place where only the split into micro-batches or the CUDA graphs change, else by building the new plan's
model (before training: at once; during training: the loop checkpoints first and the run resumes from it).
"""

from __future__ import annotations

import gc

import torch

from snugtune.engine.build import Job, Run, build_run, held_out_batches, new_graphs
from snugtune.engine.step import accumulate_gradients
from snugtune.objectives import held_out_loss
from snugtune.planner.apply import step_down as next_plan
from snugtune.planner.plan import Plan, needs_new_model


def build_that_fits(job: Job, plan: Plan) -> Run:
    """Build `plan`; on a GPU in one process, run one probe step and step down until it fits."""
    while True:
        run = build_run(job, plan)
        if job.device.type != "cuda" or job.ctx.enabled or _probe_fits(run):
            return run
        plan = run.plan  # the probe stepped down to a plan that needs another model
        del run
        free_device_memory(job.device)


def _probe_fits(run: Run) -> bool:
    """Probe until the step fits, stepping down in place; False when a step down needs another model."""
    while True:
        try:
            probe(run)
            return True
        except torch.OutOfMemoryError:
            if step_down(run, "the probe step"):
                return False


def probe(run: Run) -> None:
    """One full step on the longest micro-batch (optimizer state allocated, learning rate 0) and one held-out
    batch, then everything put back: late OOMs come from exactly these, so they surface now."""
    optimizer, scaler = run.optimizer, run.scaler
    rows = run.job.first_epoch_rows
    longest = sorted(rows, key=lambda row: -sum(example.length for example in row))[: run.config.train.micro_batch]
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        accumulate_gradients(run.model, [run.batch_of(longest)], run.job.precision, scaler, run.job.device,
                             offload=run.offload, objective=run.objective)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        scaler.step(optimizer)
        if run.held_out:
            held_out_loss(run.objective, run.model, [max(run.held_out, key=lambda b: b["input_ids"].numel())],
                          run.job.precision, run.job.device)
    finally:
        optimizer.zero_grad(set_to_none=False)
        optimizer.state.clear()  # the first real step starts from fresh moments, as it would without a probe
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        if scaler.is_enabled():
            scaler.update(scaler.get_scale())  # close the probe's scaler step, keeping the scale
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])


def step_down(run: Run, where: str) -> bool:
    """After an OOM `where`: what the failed step held freed, and the planner's next plan announced and recorded
    in run.plan; True when it needs another model (the caller builds it), else the run carries on with the
    new split, without graphs."""
    job = run.job
    run.optimizer.zero_grad(set_to_none=False)
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    plan, notice = next_plan(job.asked, run.plan, where, job.inventory, job.trained_per_row, job.masked)
    job.notify(notice)
    job.step_downs.append(notice)
    rebuild = needs_new_model(run.plan.config, plan.config)
    run.plan = plan
    if rebuild:
        return True
    run.held_out = held_out_batches(job, plan.config)
    if run.graphs is not None:  # drop the old shapes' graphs and their memory pool
        run.graphs.release("stepped down after running out of memory")
        run.graphs = new_graphs(job, run.model, run.scaler, run.objective) if plan.decisions.cuda_graphs else None
    return False


def free_device_memory(device: torch.device) -> None:
    """Give a dropped model's memory back before the next is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
