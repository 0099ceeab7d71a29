"""The training recipe, read top to bottom in the manner of torchtune's recipes:

    set_up (device, data, the plan) -> build what the plan describes, probing that it fits (engine.recovery)
    -> resume -> held-out loss before -> train_steps (per optimizer step: engine.step's accumulate_gradients
    and optimizer_step, log, checkpoint) -> final checkpoint -> finish (held-out loss after, artifacts, summary).

The planner decides; this file executes its plan. An out-of-memory error steps down to the planner's next
plan: in place, or, where it needs another model, through a checkpoint and a rebuild (the loop in train()).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from math import nan
from pathlib import Path

import torch

from snugtune.attention import varlen_usable
from snugtune.config import RESUME_LENGTH_FIELDS, RESUME_SAFE_FIELDS, Config, changed_fields, config_to_yaml
from snugtune.data.batches import GPU_PAD_MULTIPLE, real_tokens
from snugtune.data.prepare import prepare_data
from snugtune.data.prep_report import report_lines
from snugtune.engine.build import Job, Run
from snugtune.engine.checkpoint import (TrainPosition, checkpoint_metrics, load_checkpoint, save_checkpoint,
                                        saved_config, saved_position, trainable_state)
from snugtune.engine.distributed import (SINGLE, DistContext, agree_on_checkpoint, barrier, failures_named, start,
                                         step_share, sum_across)
from snugtune.engine.machine import cap_memory, device_description, peak_memory_bytes, versions
from snugtune.engine.progress import TrainProgress
from snugtune.engine.recovery import build_that_fits, free_device_memory, step_down
from snugtune.engine.signals import StopRequests
from snugtune.engine.step import StepResult, accumulate_gradients, optimizer_step
from snugtune.errors import TrainingDiverged, TrainingInterrupted, UserError
from snugtune.lora_dropout import start_lora_dropout_step
from snugtune.memory_rules import SEQUENCES_PER_ROW, rows_masked
from snugtune.models.cache import default_cache_dir
from snugtune.models.load import load_tokenizer
from snugtune.models.resolve import resolve_model
from snugtune.objectives import held_out_loss as objective_held_out_loss, training_objective
from snugtune.planner.apply import plan_run, planned_figures
from snugtune.planner.inventory import inventory_of_folder
from snugtune.precision import resolve_device, resolve_precision
from snugtune.preference_loss import metric_means
from snugtune.rundir import (CHECKPOINTS, MetricsLog, RunFolder, hold_run_lock, plot_losses, prepare_run_folder,
                             save_model_artifacts)
from snugtune.trackers import open_trackers

REBUILD = "rebuild"  # train_steps' answer when an OOM stepped down to a plan that needs another model


def train(config: Config, show_progress: bool = True, notify=lambda message: None, ctx: DistContext = SINGLE,
          accept_new_data: bool = False, stop: StopRequests | None = None) -> dict:
    """Fine-tune per `config`, resuming from output_dir's newest complete checkpoint. Returns summary.json's dict.

    `notify(str)` receives one-line notices (resuming, the planner's choices, step downs). SIGINT/SIGTERM finish
    the current step, save a checkpoint and raise TrainingInterrupted. Under torchrun (ctx from
    engine.distributed.context_from_env) each process trains on its share of every step's rows through
    PyTorch's DDP or FSDP; only rank 0 writes metrics, checkpoints and artifacts, and holds the run folder's
    lock; another process that dies or hangs makes this one raise AnotherProcessFailed (within
    train.collective_timeout_s). A resume on data whose content changed since the checkpoint is refused
    unless accept_new_data.
    """
    started = time.perf_counter()
    run_dir = Path(config.output_dir)
    prepare_run_folder(run_dir)  # every process judges the folder alike; one writes into it and holds it
    stop = stop or StopRequests()  # the CLI's, installed before the libraries load: a signal then is kept too
    with stop.installed(), hold_run_lock(run_dir) if ctx.is_main else nullcontext(), \
            failures_named(ctx, config.train.collective_timeout_s):
        job = set_up(config, notify if ctx.is_main else (lambda message: None), ctx, started, accept_new_data)
        plan = plan_run(config, job.inventory, job.trained_per_row, ctx.world_size, job.masked,
                        job.device.type == "cuda", job.notify,
                        job.objective.lengths_vary(job.first_epoch_rows, job.pad_multiple))
        while True:
            run = build_that_fits(job, plan)
            run.started = started
            position, log, resumed_from = resume(run)
            eval_before = held_out_before(run, log)
            stopped = train_steps(run, position, log, stop, show_progress and ctx.is_main)
            if stopped != REBUILD:
                break
            log.close()
            plan, started = run.plan, time.perf_counter()  # the new plan's model resumes from the step's checkpoint
            del run
            free_device_memory(job.device)
        save_checkpoint_now(run, position, log)
        if stopped and position.step < run.total_steps:
            log.close()  # trackers finish their run here: the command then ends without interpreter shutdown
            raise TrainingInterrupted(f"{stopped} at step {position.step}: checkpoint saved in "
                                      f"{job.run_dir / CHECKPOINTS}; run the same command to resume")
        return finish(run, position, log, eval_before, resumed_from)


# --- set up --------------------------------------------------------------------------------------

def set_up(config: Config, notify, ctx: DistContext, started: float, accept_new_data: bool = False) -> Job:
    """The device (capped to the budget), the base model's tokenizer and inventory, and the data."""
    if ctx.enabled and config.objective != "sft":
        raise UserError(f"objective: {config.objective} trains in one process for now (torchrun started "
                        f"{ctx.world_size}); run `snugtune train` without torchrun")
    device = _device_for(config, ctx)
    # before the process group: once there is one, transformers' save_pretrained writes on global rank 0 only,
    # and a shape or GGUF model another process builds into its cache would lack its weights
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle_weights)
    start(ctx, device, config.train.collective_timeout_s)
    if device.type == "cuda":  # building a shape model on the GPU is not part of the run's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer = load_tokenizer(resolved.path, config.trust_remote_code)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.train.seed,
                        cache_dir=default_cache_dir() / "data", objective=config.objective)
    for line in report_lines(data.report):
        notify(line)
    objective = training_objective(config)
    packed_len = config.max_seq_len if config.data.packing and objective.objective.packs_rows else None
    first_epoch_rows = objective.epoch_rows(data.train, config.train.seed, 0, packed_len)
    capped = cap_memory(device, config.budget)
    if capped:
        notify(capped)
    return Job(asked=config, ctx=ctx, device=device, precision=resolve_precision(config.train.precision, device),
               notify=notify, run_dir=Path(config.output_dir), base_path=resolved.path, tokenizer=tokenizer,
               data=data, objective=objective, inventory=inventory_of_folder(resolved.path, config.trust_remote_code),
               packed_len=packed_len, first_epoch_rows=first_epoch_rows,
               trained_per_row=[objective.scored_tokens(row) for row in first_epoch_rows],
               masked=rows_masked(config.data.packing, varlen_usable(device, config.train.attention_kernels),
                                  # a pair's two sequences: one row
                                  any(len(row) > 1 for row in first_epoch_rows) or SEQUENCES_PER_ROW[config.objective] > 1),
               pad_multiple=GPU_PAD_MULTIPLE if device.type == "cuda" else 1,  # lengths exact on the CPU
               started=started, accept_new_data=accept_new_data)


def _device_for(config: Config, ctx: DistContext) -> torch.device:
    device = resolve_device(config.device)
    if ctx.enabled and device.type == "cuda":  # this machine's GPU number LOCAL_RANK
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device


# --- resume --------------------------------------------------------------------------------------

def resume(run: Run) -> tuple[TrainPosition, MetricsLog, Path | None]:
    """The position to start from (the newest complete checkpoint's, or the start), the metrics log with the
    rows logged up to it, and that checkpoint. Writes the run's config.yaml."""
    job = run.job
    folder = RunFolder(job.run_dir)
    position = TrainPosition(rows_per_step=run.rows_per_step, data_digest=job.data.content_digest)
    metrics: list[dict] = []
    checkpoints = folder.checkpoints()
    resumed_from = checkpoints[-1] if checkpoints else None
    agree_on_checkpoint(job.ctx, resumed_from, job.run_dir)
    if resumed_from is not None:
        _check_resume_config(resumed_from, run.config, run.rows_per_step, job.notify)
        position = load_checkpoint(resumed_from, run.model, run.optimizer, run.scheduler, run.scaler, job.notify)
        position.rows_per_step = run.rows_per_step
        _check_resume_data(resumed_from, position, job)
        run.earlier_seconds = position.run_seconds
        metrics = checkpoint_metrics(resumed_from)  # rows logged after it are re-done
        job.notify(f"resuming from {resumed_from} (step {position.step} of {run.total_steps})")
    log = MetricsLog(job.run_dir, metrics, tensorboard=run.config.log.tensorboard, write=job.ctx.is_main,
                     trackers=open_trackers(run.config, job.run_dir, metrics) if job.ctx.is_main else None)
    if job.ctx.is_main:
        folder.write_config(config_to_yaml(run.config))
    return position, log, resumed_from


def _check_resume_config(checkpoint: Path, config: Config, rows_per_step: int, notify) -> None:
    """Refuse to resume with a config that would train something else; allow harmless changes,
    including another split of the same rows per step over micro-batches, accumulation and processes."""
    changed = changed_fields(saved_config(checkpoint), config)
    refused = [f for f in changed if f not in RESUME_SAFE_FIELDS | RESUME_LENGTH_FIELDS]
    saved_rows = saved_position(checkpoint).rows_per_step or rows_per_step
    if saved_rows != rows_per_step:
        refused.append(f"rows per step (micro_batch x grad_accum x processes: {saved_rows} then, {rows_per_step} now)")
    if refused:
        raise UserError(f"{checkpoint.parent.parent}: the config differs from the checkpointed run in "
                        f"{', '.join(refused)}; resume with the same settings, or pass --fresh to start over")
    if any(f in RESUME_LENGTH_FIELDS for f in changed):
        notify("run length changed: the learning-rate schedule is recomputed over the new number of steps")


def _check_resume_data(checkpoint: Path, position: TrainPosition, job: Job) -> None:
    """Refuse to resume on data whose content changed since the checkpoint (other rows, another held-out set),
    unless the user accepts it; an accepted change is recorded in the position (and so in summary.json)."""
    now = job.data.content_digest
    if not position.data_digest or position.data_digest == now:  # checkpoints before digests were kept
        position.data_digest = now
        return
    if not job.accept_new_data:
        raise UserError(f"{job.asked.data.path}: the data changed since the checkpoint {checkpoint.name} (content "
                        f"{position.data_digest[:12]} then, {now[:12]} now); resuming would train on other rows and "
                        f"compare held-out losses on another set: restore the data, pass --accept-new-data to go on "
                        f"with it, or --fresh to start over")
    job.notify(f"the data changed since {checkpoint.name}: resuming on the new data, as asked (--accept-new-data)")
    position.data_changes.append({"step": position.step, "from": position.data_digest, "to": now})
    position.data_digest = now


def held_out_before(run: Run, log: MetricsLog) -> dict:
    """The held-out row before training (eval_loss and the objective's eval_ metrics): logged as step 0 once,
    read back from the log on a resume."""
    before = [m for m in log.rows if m["step"] == 0 and "eval_loss" in m]
    if before:
        return before[0]
    row = {"step": 0, "epoch": 0.0, **held_out_row(run)}
    log.write(row)
    return row


def held_out_row(run: Run) -> dict:
    """The objective's loss on the held-out batches (eval_loss), what it is a mean over (eval_count: tokens,
    pairs or rows) and its metrics (eval_rewards/margins, ...). Under torchrun each process scores its share
    (batches r, r+N, ...: no process evaluates alone while the others wait) and the sums are added; under
    FSDP a process short of a batch runs one unscored, so the gathers pair up. (The metrics are one
    process's: the preference objectives train in one.)"""
    ctx = run.job.ctx
    shares, padding = step_share(run.held_out, ctx, 1)
    mine = [share[0] for share in shares]
    loss, count, metrics = _held_out_beside_graphs(run, mine[:len(mine) - padding])
    if padding and run.fsdp_root is not None:
        _held_out_beside_graphs(run, mine[len(mine) - padding:])
    total, count = sum_across(ctx, loss * count if count else 0.0), int(sum_across(ctx, count))
    return {"eval_loss": total / count if count else nan, "eval_count": count,
            **{f"eval_{name}": value for name, value in metrics.items()}}


def _held_out_beside_graphs(run: Run, batches: list) -> tuple[float, int, dict]:
    """The objective's held-out loss; if the CUDA graphs' memory pool leaves evaluation too little, the graphs
    are dropped."""
    job = run.job
    try:
        return objective_held_out_loss(run.objective, run.evaluator, batches, job.precision, job.device)
    except torch.OutOfMemoryError:
        if run.graphs is None or not run.graphs.graphs:
            raise
        run.graphs.release("released: evaluation ran out of memory beside the graphs' memory pool")
        job.notify("CUDA graphs released to make room for evaluation; training continues without them")
        return objective_held_out_loss(run.objective, run.evaluator, batches, job.precision, job.device)


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Window:
    """What the loop counts since the last logged row, and the current run of non-finite steps."""
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)
    nonfinite_in_a_row: int = 0


def train_steps(run: Run, position: TrainPosition, log: MetricsLog, stop: StopRequests,
                show_progress: bool) -> str | None:
    """Optimizer steps, epoch after epoch, until the run's last. Returns why it stopped early: a signal's name
    (one that came while loading and was swallowed stops it before the first step), or REBUILD when an
    out-of-memory error stepped down to a plan that needs another model (this step is then checkpointed, and
    the new model resumes from it)."""
    job = run.job
    progress = TrainProgress(run.total_steps, position.step, enabled=show_progress)
    window = Window()
    stop.agree(job.ctx)
    stop.stepping = True
    try:
        while position.step < run.total_steps and not stop.agreed:
            rows = job.objective.epoch_rows(job.data.train, run.config.train.seed, position.epoch, job.packed_len)
            while position.rows_in_epoch < len(rows) and position.step < run.total_steps:
                tc = run.config.train
                step_rows = rows[position.rows_in_epoch:][: run.rows_per_step]
                shares, padding = step_share(step_rows, job.ctx, tc.micro_batch)
                group = [run.batch_of(share) for share in shares]
                start_lora_dropout_step(run.model, position.step)  # masks keyed by the step: resume redraws them
                step_metrics = {}  # the objective's, summed over the step's micro-batches
                try:
                    step_loss = accumulate_gradients(run.stepper, group, job.precision, run.scaler, job.device,
                                                     job.ctx, run.offload, run.graphs, padding, run.objective,
                                                     step_metrics)
                except torch.OutOfMemoryError:
                    if job.ctx.enabled:
                        raise
                    group.clear()  # free the batches before stepping down
                    trained_with = config_to_yaml(run.config)
                    if step_down(run, f"step {position.step + 1}"):
                        save_checkpoint_now(run, position, log, trained_with)
                        return REBUILD
                    RunFolder(job.run_dir).write_config(config_to_yaml(run.config))
                    continue  # the same rows again, split as the new plan says
                step_tokens = int(sum_across(job.ctx, sum(real_tokens(b) for b in group[:len(group) - padding])))
                result = optimizer_step(run.optimizer, run.scheduler, run.scaler, run.params, tc.max_grad_norm,
                                        step_loss, job.precision.loss_scaling)
                window.nonfinite_in_a_row = 0 if result.finite else window.nonfinite_in_a_row + 1
                window.tokens += step_tokens
                position.skipped_steps += not result.finite
                position.step += 1
                position.rows_in_epoch += len(step_rows)
                position.tokens_trained += step_tokens
                _log_step(run, position, len(rows), log, progress, window, step_loss, result,
                          metric_means(step_metrics))
                if window.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    _raise_diverged(run, position, window.nonfinite_in_a_row)
                stop.agree(job.ctx)  # a signal to any process stops every process after this same step
                if stop.agreed:
                    break
                # no periodic checkpoint inside a run of non-finite steps: the last one kept stays a good one
                if result.finite and position.step % run.config.save.every_steps == 0 \
                        and position.step < run.total_steps:
                    save_checkpoint_now(run, position, log)
            if position.rows_in_epoch >= len(rows):
                position.epoch += 1
                position.rows_in_epoch = 0
    finally:
        stop.stepping = False
        progress.close()
    return stop.agreed


def _log_step(run: Run, position: TrainPosition, epoch_rows_count: int, log: MetricsLog, progress: TrainProgress,
              window: Window, step_loss: float, result: StepResult, metrics: dict) -> None:
    """A metrics row every log_every steps, at the last step, at a non-finite step and where evaluation is due;
    with the objective's metrics of the step (rewards/margins, ...)."""
    every = run.config.eval.every_steps
    eval_due = bool(every) and position.step % every == 0
    if not (position.step % run.config.train.log_every == 0 or position.step == run.total_steps
            or not result.finite or eval_due):
        return
    now = time.perf_counter()
    row = {"step": position.step, "epoch": round(position.epoch + position.rows_in_epoch / epoch_rows_count, 4),
           "loss": step_loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
           "tokens_per_s": window.tokens / max(now - window.since, 1e-9),
           "memory_bytes": _current_memory(run.job.device), "skipped_steps": position.skipped_steps, **metrics}
    if eval_due and position.step < run.total_steps and run.held_out:
        row.update(held_out_row(run))
    log.write(row)
    progress.update(position.step, step_loss, row["tokens_per_s"], row["memory_bytes"])
    window.tokens, window.since = 0, now


def _raise_diverged(run: Run, position: TrainPosition, in_a_row: int) -> None:
    kept = RunFolder(run.job.run_dir).checkpoints()
    raise TrainingDiverged(
        f"training diverged: {in_a_row} consecutive steps with a non-finite loss or gradient "
        f"(up to step {position.step}); " + (f"the last good checkpoint {kept[-1]} is kept; " if kept else "")
        + "lower train.lr, or use bf16 instead of fp16")


def save_checkpoint_now(run: Run, position: TrainPosition, log: MetricsLog, config_yaml: str | None = None) -> None:
    """A checkpoint of this position (with `config_yaml`, the config that trained up to it: the run's own by
    default)."""
    ctx = run.job.ctx
    position.run_seconds = run.earlier_seconds + time.perf_counter() - run.started
    if ctx.is_main or run.fsdp_root is not None:  # FSDP: every process gathers its shards, rank 0 writes
        save_checkpoint(run.job.run_dir, run.model, run.optimizer, run.scheduler, run.scaler, position,
                        run.config.save.keep, log.rows, config_yaml or config_to_yaml(run.config),
                        write=ctx.is_main)
    barrier(ctx)


def _current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_memory_bytes(device)


# --- finish --------------------------------------------------------------------------------------

def finish(run: Run, position: TrainPosition, log: MetricsLog, eval_before: dict,
           resumed_from: Path | None) -> dict:
    """Held-out loss after training, the adapter (or trained model), summary.json and loss.png."""
    job = run.job
    eval_after = held_out_row(run)
    log.write({"step": position.step, "epoch": float(position.epoch), **eval_after})
    log.close()
    whole = trainable_state(run.model) if run.fsdp_root is not None else None  # FSDP: every process gathers
    if job.ctx.is_main:
        save_model_artifacts(job.run_dir, run.model, job.tokenizer, job.base_path, run.config.uses_lora, whole)
    summary = _summary(run, position, log, eval_before, eval_after, resumed_from)
    if job.ctx.is_main:
        RunFolder(job.run_dir).write_summary(summary)
        plot_losses(job.run_dir, log.rows)
    barrier(job.ctx)
    return summary


def _summary(run: Run, position: TrainPosition, log: MetricsLog, before: dict, after: dict,
             resumed_from: Path | None) -> dict:
    job, config, graphs = run.job, run.config, run.graphs
    losses = [m["loss"] for m in log.rows if "loss" in m]
    metrics = lambda row: {k[5:]: v for k, v in row.items() if k.startswith("eval_") and k not in  # noqa: E731
                           ("eval_loss", "eval_count")}
    return {
        "model": config.model, "base_model_path": str(job.base_path), "method": config.method,
        "objective": config.objective, "reference": run.plan.decisions.reference,
        "train_loss_final": losses[-1] if losses else None,
        "train_loss_final_mean10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "eval_tokens": after.get("eval_count", 0),  # sft: tokens; preference: pairs (kto: rows)
        "eval_metrics_before": metrics(before), "eval_metrics_after": metrics(after),
        "peak_memory_bytes": peak_memory_bytes(job.device),
        "peak_memory_kind": "cuda max_memory_reserved" if job.device.type == "cuda" else "process peak RSS",
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(job.device)) if job.device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - job.started, "steps": position.step,
        "run_wall_seconds": run.earlier_seconds + time.perf_counter() - run.started,
        "skipped_steps": position.skipped_steps, "tokens_trained": position.tokens_trained,
        "data_digest": position.data_digest, "data_changes": position.data_changes,
        "trainable_params": run.counts["trainable_params"], "total_params": run.counts["total_params"],
        "precision": job.precision.name, "device": device_description(job.device), "versions": versions(),
        "data": asdict(job.data.report), "resumed_from": str(resumed_from) if resumed_from else None,
        "world_size": job.ctx.world_size, "plan": planned_figures(run.plan),
        "oom_resplits": len(job.step_downs), "step_downs": job.step_downs,
        "speedups": asdict(run.speedups),
        "cuda_graphs": ({"shapes": len(graphs.graphs), "failure": graphs.failure} if graphs else None),
        "data_parallel": run.plan.decisions.data_parallel if job.ctx.enabled else None,
        "frozen_weight_bytes_per_process": run.counts["frozen_weight_bytes_per_process"],
        "micro_batch": config.train.micro_batch, "grad_accum": config.train.grad_accum,
    }
