"""The training recipe: one function that reads top to bottom, in the style of torchtune's recipes.

set up (device, precision, model, data, optimizer) -> resume -> held-out loss before -> loop over
optimizer steps (accumulate, unscale, clip, step, log, checkpoint) -> held-out loss after -> artifacts.
"""

from __future__ import annotations

import contextlib
from functools import partial
import json
import math
from math import nan
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from snugtune.config import RESUME_LENGTH_FIELDS, RESUME_SAFE_FIELDS, Config, changed_fields, config_to_yaml
from snugtune.errors import ConfigError, DoesNotFit, TrainingDiverged, TrainingInterrupted, UserError
from snugtune.data import (GPU_PAD_MULTIPLE, collate_micro_batch, epoch_rows, eval_batches, prepare_data, real_tokens,
                           trained_tokens_per_row)
from snugtune.data.tokenize import IGNORE, ensure_chat_template
from snugtune.engine.distributed import (DistContext, LossModule, barrier, full_tensor, local_bytes, shard_with_fsdp,
                                         start, sum_across)
from snugtune.engine.checkpoint import (TrainPosition, checkpoint_metrics, complete_checkpoints, load_checkpoint,
                                        save_checkpoint, trainable_state)
from snugtune.engine.graphs import StepGraphs
from snugtune.engine.loss import mean_loss, token_loss_sum
from snugtune.engine.offload import ActivationOffload, WeightStreamer, keep_embeddings_on_host
from snugtune.engine.speedups import apply_speedups
from snugtune.engine.tiling import tile_mlps
from snugtune.engine.optim import build_optimizer, build_scheduler, flatten_trainable
from snugtune.engine.precision import resolve_device, resolve_precision
from snugtune.engine.progress import TrainProgress
from snugtune.engine.signals import StopRequests
from snugtune.engine.rundir import (MetricsLog, device_description, peak_memory_bytes, plot_losses, save_model_artifacts,
                                    versions, write_json_atomic, write_text_atomic)
from snugtune.planner import offload_choices, plan_config
from snugtune.planner.cards import budget_bytes
from snugtune.planner.memory import CUDA_CONTEXT
from snugtune.methods import METHODS
from snugtune.models import (check_vocab, count_parameters, decoder_layers, default_cache_dir, load_base_model,
                             load_tokenizer, prepare_for_training, resolve_model)


SINGLE = DistContext()




def _pad_multiple(device: torch.device) -> int:
    """Sequence lengths are rounded up to this (data.batches.GPU_PAD_MULTIPLE on a GPU; exact on the CPU)."""
    return GPU_PAD_MULTIPLE if device.type == "cuda" else 1


def trained_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions the loss scores in a batch (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def accumulate_gradients(model, group: list[dict[str, torch.Tensor]], precision, scaler, device: torch.device,
                         ctx: DistContext = SINGLE, offload: ActivationOffload | None = None,
                         graphs: StepGraphs | None = None) -> float:
    """Forward/backward every micro-batch of one optimizer step; returns the step's mean token loss.

    The loss is normalised by the trained tokens of the whole accumulated batch, over all processes,
    so micro-batch 1 x accumulation 8 gives the same gradient as 8 x 1 on variable-length data, and N
    processes the same as one. `model` may be DDP(LossModule): it then syncs gradients on the last
    micro-batch only. `offload` keeps what backward needs in host memory (engine.offload); `graphs`
    replays each micro-batch's forward and backward as a CUDA graph (engine.graphs; one process).
    """
    n_scored = max(1, int(sum_across(ctx, sum(trained_positions(b) for b in group))))
    ddp = isinstance(model, DDP)
    wrapped = ddp or isinstance(model, LossModule)  # DDP, or the FSDP root around model + loss
    step_loss = 0.0
    for i, batch in enumerate(group):
        if graphs is not None:
            step_loss += float(graphs.forward_backward(batch, ctx.world_size / n_scored)) / n_scored
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = model.no_sync() if ddp and i < len(group) - 1 else contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter on the last micro-batch only
            model.set_requires_gradient_sync(i == len(group) - 1)
        with sync:
            with precision.autocast(), offload or contextlib.nullcontext():
                loss_sum, _ = model(batch) if wrapped else token_loss_sum(model, batch)
            # DDP and FSDP average gradients over processes; the world size turns that back into the sum
            scaler.scale(loss_sum * ctx.world_size / n_scored).backward()
        step_loss += float(loss_sum.detach()) / n_scored
    return sum_across(ctx, step_loss)


def _check_resume_config(checkpoint: Path, config: Config, rows_per_step: int, notify) -> None:
    """Refuse to resume with a config that would train something else; allow harmless changes,
    including another split of the same rows per step over micro-batches, accumulation and processes."""
    changed = changed_fields((checkpoint / "config.yaml").read_text(), config)
    refused = [f for f in changed if f not in RESUME_SAFE_FIELDS | RESUME_LENGTH_FIELDS]
    saved_rows = json.loads((checkpoint / "position.json").read_text()).get("rows_per_step") or rows_per_step
    if saved_rows != rows_per_step:
        refused.append(f"rows per step (micro_batch x grad_accum x processes: {saved_rows} then, {rows_per_step} now)")
    if refused:
        raise UserError(f"{checkpoint.parent.parent}: the config differs from the checkpointed run in "
                        f"{', '.join(refused)}; resume with the same settings, or pass --fresh to start over")
    if any(f in RESUME_LENGTH_FIELDS for f in changed):
        notify("run length changed: the learning-rate schedule is recomputed over the new number of steps")


def _use_fsdp(config: Config, ctx: DistContext, streaming: bool) -> bool:
    """FSDP under torchrun when asked (data_parallel: fsdp, or auto resolved to it by the planner)."""
    if not ctx.enabled or config.train.data_parallel != "fsdp":
        return False
    sharded = [name for name, m in METHODS.items() if m.shards_with_fsdp]
    if not METHODS[config.method].shards_with_fsdp:
        raise ConfigError(f"train.data_parallel: fsdp trains {', '.join(sharded)}, not method={config.method} "
                          f"(or use data_parallel: ddp)")
    if streaming:
        raise ConfigError("train.data_parallel: fsdp does not combine with offload.weights (or use data_parallel: ddp)")
    return True


def _with_train(config: Config, **changes) -> Config:
    return config.model_copy(update={"train": config.train.model_copy(update=changes)})


def _plan_memory(config: Config, device: torch.device, notify, trained_per_row: list[int],
                 world_size: int = 1, masked: bool = True) -> tuple[Config, dict | None]:
    """On a GPU: cap memory at the budget, plan (knowing each row's trained positions, and whether batches
    carry an attention mask), and apply the planner's micro-batch/checkpointing.
    Returns the config to run and the plan's figures for summary.json (None on CPU, where there is no
    card to fit and checkpointing 'auto' means off)."""
    if device.type != "cuda":  # auto: no checkpointing (nothing to fit) unless weights stream, which needs it
        if config.train.grad_checkpointing == "auto":
            config = _with_train(config, grad_checkpointing=config.offload.weights is True)
        return config, None
    if config.budget != "auto":  # simulate a smaller card on a bigger one
        budget, _, card = budget_bytes(config.budget)
        total = torch.cuda.get_device_properties(device).total_memory
        if budget < total:  # the smaller card's CUDA context is outside the allocator but inside its memory
            torch.cuda.set_per_process_memory_fraction((budget - CUDA_CONTEXT) / total, device)
            notify(f"memory capped at {budget / 2**30:.1f} GiB ({card}) of this {total / 2**30:.0f} GiB GPU")
    plan = plan_config(config, trained_per_row=trained_per_row, gpus=max(1, world_size), masked=masked)
    if not plan.fits:
        raise DoesNotFit(f"predicted peak {plan.peak_bytes / 2**30:.1f} GiB does not fit the "
                         f"{plan.budget_bytes / 2**30:.1f} GiB budget ({plan.card}); try {plan.suggestion} "
                         f"(see `snugtune plan`)")
    for key, (asked, chosen) in plan.changes.items():
        notify(f"planner: {key} = {chosen} (config: {asked})")
    planned = {"predicted_peak_bytes": plan.peak_bytes, "budget_bytes": plan.budget_bytes, "card": plan.card,
               "micro_batch": plan.settings.micro_batch, "grad_accum": plan.grad_accum,
               "grad_checkpointing": plan.settings.grad_checkpointing,
               "checkpoint_layers": plan.settings.checkpointed_layers,
               "offload_activations": plan.settings.offload_activations,
               "offload_weights": plan.settings.stream_weights, "offload_embeddings": plan.settings.embeddings_on_host,
               "tiled_mlp": plan.settings.tiled_mlp,
               "host_bytes": plan.host_bytes}
    planned["data_parallel"] = ("fsdp" if plan.settings.shards > 1 else "ddp") if world_size > 1 else None
    config = config.model_copy(update={"offload": config.offload.model_copy(update=offload_choices(plan.settings))})
    return _with_train(config, micro_batch=plan.settings.micro_batch, grad_accum=plan.grad_accum,
                       grad_checkpointing=plan.settings.grad_checkpointing,
                       checkpoint_layers=plan.settings.checkpointed_layers, tiled_mlp=plan.settings.tiled_mlp,
                       data_parallel=planned["data_parallel"] or config.train.data_parallel), planned


def _split_after_oom(config: Config, where: str, notify) -> Config:
    """After an OOM: the next smaller micro-batch that divides the rows per step, accumulation raised to keep
    the rows per step. DoesNotFit when the micro-batch is already 1."""
    tc = config.train
    rows = tc.micro_batch * tc.grad_accum
    smaller = [d for d in range(tc.micro_batch - 1, 0, -1) if rows % d == 0]
    if not smaller:
        raise DoesNotFit(f"{where} ran out of memory even with micro_batch=1; lower max_seq_len or use "
                         f"method=qlora (see `snugtune plan`)")
    notify(f"{where} ran out of memory: re-planned to micro_batch={smaller[0]} x grad_accum={rows // smaller[0]} "
           f"(same rows per step), continuing")
    return _with_train(config, micro_batch=smaller[0], grad_accum=rows // smaller[0])


def _probe(model, optimizer, scaler, rows, eval_batch, config, precision, device, batch_of, offload) -> None:
    """One full step on the longest micro-batch (optimizer state allocated, learning rate 0) and one eval
    batch, then everything put back: late OOMs come from exactly these, so they surface now."""
    longest = sorted(rows, key=lambda row: -sum(len(s.input_ids) for s in row))[: config.train.micro_batch]
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        accumulate_gradients(model, [batch_of(longest)], precision, scaler, device, offload=offload)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        scaler.step(optimizer)
        if eval_batch is not None:
            mean_loss(model, [eval_batch], precision, device)
    finally:
        optimizer.zero_grad(set_to_none=False)
        optimizer.state.clear()  # the first real step starts from fresh moments, as it would without a probe
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        if scaler.is_enabled():
            scaler.update(scaler.get_scale())  # close the probe's scaler step, keeping the scale
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"output_dir: {run_dir} exists and is not a plain folder (a file or a link); choose another")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None


def train(config: Config, show_progress: bool = True, notify=lambda message: None, ctx: DistContext = SINGLE) -> dict:
    """Fine-tune per `config`, resuming from output_dir's newest complete checkpoint. Returns summary.json's dict.

    `notify(str)` receives one-line notices (resuming, schedule changes). SIGINT/SIGTERM finish the
    current step, save a checkpoint and raise TrainingInterrupted. Under torchrun (ctx from
    engine.distributed.context_from_env) each process trains on its share of every step's rows through
    PyTorch's DDP; only rank 0 writes metrics, checkpoints and artifacts.
    """
    started = time.perf_counter()
    run_dir = Path(config.output_dir)
    _prepare_run_dir(run_dir)
    device = resolve_device(config.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    start(ctx, device)
    if not ctx.is_main:
        notify = lambda message: None  # noqa: E731 (rank 0 speaks for all)
        show_progress = False
    precision = resolve_precision(config.train.precision, device)

    # --- model and data -------------------------------------------------------------------------
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle_weights)
    if device.type == "cuda":  # building a shape model on the GPU is not part of the run's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer = load_tokenizer(resolved.path, config.trust_remote_code)
    ensure_chat_template(tokenizer)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.train.seed,
                        cache_dir=default_cache_dir() / "data")
    packed_len = config.max_seq_len if config.data.packing else None
    first_epoch_rows = epoch_rows(data.train, config.train.seed, 0, packed_len)
    # packed rows of one sample each (long documents) run unmasked causal attention; padded batches are masked
    masked = not config.data.packing or any(len(row) > 1 for row in first_epoch_rows)
    config, planned = _plan_memory(config, device, notify, trained_tokens_per_row(first_epoch_rows), ctx.world_size,
                                   masked)
    oom_resplits = 0
    torch.manual_seed(config.train.seed)
    stream = config.offload.weights is True
    fsdp = _use_fsdp(config, ctx, stream)
    model = load_base_model(resolved.path, config, device, precision.compute_dtype, load_on_cpu=stream or fsdp,
                            shardable=fsdp)
    check_vocab(model, tokenizer, config.model)
    model = prepare_for_training(model, config)
    if stream:  # frozen block weights stay in host memory, one block ahead on the device
        WeightStreamer(decoder_layers(model), device).attach(model)
    if config.offload.embeddings is True and not fsdp and not stream:
        if not keep_embeddings_on_host(model, device):
            notify("offload.embeddings: the input embeddings are trained or tied to the output head; kept on the GPU")
    if config.train.tiled_mlp is True:  # long contexts: one MLP tile's intermediates at a time
        tile_mlps(decoder_layers(model))
    speedups = apply_speedups(model, decoder_layers(model), config, device, ctx.enabled, stream, fsdp)
    offload = ActivationOffload() if config.offload.activations is True else None
    model.train()
    trainable_params, total_params = count_parameters(model)
    root = None
    # loaded on the CPU: FSDP moves each unit to this process's GPU as it shards it, and bitsandbytes'
    # Params4bit.to() takes the 4-bit scales along
    if fsdp:
        root = shard_with_fsdp(model, decoder_layers(model), token_loss_sum)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    frozen_bytes = sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)
    if fsdp and config.train.optimizer != "adamw":
        notify(f"FSDP: LoRA is trained with torch AdamW (not {config.train.optimizer}: bitsandbytes' optimizers "
               f"do not take sharded tensors); its state is small")
        config = _with_train(config, optimizer="adamw")

    # --- optimization ---------------------------------------------------------------------------
    tc = config.train
    rows_per_step = tc.micro_batch * tc.grad_accum * ctx.world_size
    steps_per_epoch = math.ceil(len(first_epoch_rows) / rows_per_step)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    # LoRA: one flat tensor for the optimizer, in one process or under DDP (whose reducer copies the averaged
    # gradients back into the views), so their checkpoints load into each other; FSDP shards per tensor
    if config.uses_lora and not fsdp and params:
        params = [flatten_trainable(params)]
    optimizer = build_optimizer(params, tc, device)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    scaler = precision.grad_scaler()
    if fsdp and precision.loss_scaling:  # fp16 (T4): every process must agree on skipping a step
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(precision.device_type)
    new_graphs = partial(StepGraphs, model, device, precision.compute_dtype, scaler)
    graphs = new_graphs() if speedups.cuda_graphs else None

    pad_multiple = _pad_multiple(device)
    batch_of = partial(collate_micro_batch, pad_id=tokenizer.pad_token_id, packed=config.data.packing,
                       pad_multiple=pad_multiple, max_len=config.max_seq_len)
    held_out = eval_batches(data.eval, config.eval.batch_size, tokenizer.pad_token_id, pad_multiple,
                            config.max_seq_len)[: config.eval.max_batches]
    while device.type == "cuda" and not ctx.enabled:  # probe before the first step; on OOM split smaller
        try:
            _probe(model, optimizer, scaler, first_epoch_rows, held_out[0] if held_out else None, config,
                   precision, device, batch_of, offload)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            config = _split_after_oom(config, "the probe step", notify)
            oom_resplits += 1
            tc = config.train

    position = TrainPosition(rows_per_step=rows_per_step)
    metrics: list[dict] = []
    checkpoints = complete_checkpoints(run_dir)
    resumed_from = None
    if checkpoints:
        resumed_from = checkpoints[-1]
        _check_resume_config(resumed_from, config, rows_per_step, notify)
        position = load_checkpoint(resumed_from, model, optimizer, scheduler, scaler, notify)
        position.rows_per_step = rows_per_step
        metrics = checkpoint_metrics(resumed_from)  # rows logged after it are re-done
        notify(f"resuming from {resumed_from} (step {position.step} of {total_steps})")
    config_yaml = config_to_yaml(config)
    log = MetricsLog(run_dir, metrics, tensorboard=config.log.tensorboard, write=ctx.is_main)
    if ctx.is_main:
        write_text_atomic(run_dir / "config.yaml", config_yaml)
    # static_graph: reentrant checkpointing runs each block's backward twice through autograd
    if fsdp:
        stepper = root
    elif ctx.enabled:
        stepper = DDP(LossModule(model, token_loss_sum), device_ids=[device.index] if device.type == "cuda" else None,
                      static_graph=config.train.grad_checkpointing is True)
    else:
        stepper = model
    # with FSDP every process takes part in evaluation (the weights are sharded); rank 0 reports it
    evaluates, evaluator = ctx.is_main or fsdp, (root if fsdp else model)

    def checkpoint() -> None:
        if ctx.is_main or fsdp:  # FSDP: every process gathers its shards, rank 0 writes
            save_checkpoint(run_dir, model, optimizer, scheduler, scaler, position, config.save.keep, log.rows,
                            config_yaml, write=ctx.is_main)
        barrier(ctx)

    def evaluate() -> tuple[float, int]:
        """Held-out loss; if the CUDA graphs' memory pool leaves evaluation too little, drop the graphs."""
        try:
            return mean_loss(evaluator, held_out, precision, device)
        except torch.OutOfMemoryError:
            if graphs is None or not graphs.graphs:
                raise
            graphs.release("released: evaluation ran out of memory beside the graphs' memory pool")
            notify("CUDA graphs released to make room for evaluation; training continues without them")
            return mean_loss(evaluator, held_out, precision, device)

    before = [m["eval_loss"] for m in log.rows if m["step"] == 0 and "eval_loss" in m]
    if before:
        eval_loss_before = before[0]
    else:
        eval_loss_before = evaluate()[0] if evaluates else nan
        log.write({"step": 0, "epoch": 0.0, "eval_loss": eval_loss_before})

    # --- the loop -------------------------------------------------------------------------------
    progress = TrainProgress(total_steps, position.step, enabled=show_progress)
    log_tokens, log_time = 0, time.perf_counter()
    nonfinite_in_a_row = 0
    stop = StopRequests()
    with stop.installed():
        while position.step < total_steps and not stop.requested:
            rows = epoch_rows(data.train, tc.seed, position.epoch, packed_len)
            # every process needs at least one row of a step: a shorter tail of the epoch is left out
            while len(rows) - position.rows_in_epoch >= ctx.world_size and position.step < total_steps:
                step_rows = rows[position.rows_in_epoch: position.rows_in_epoch + tc.micro_batch * tc.grad_accum
                                 * ctx.world_size]
                mine = step_rows[ctx.rank::ctx.world_size]
                group = [batch_of(mine[k:k + tc.micro_batch]) for k in range(0, len(mine), tc.micro_batch)]
                try:
                    step_loss = accumulate_gradients(stepper, group, precision, scaler, device, ctx, offload, graphs)
                except torch.OutOfMemoryError:
                    if ctx.enabled:
                        raise
                    # free what the failed step held, split the same rows into smaller micro-batches, retry
                    optimizer.zero_grad(set_to_none=False)
                    del group
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    config = _split_after_oom(config, f"step {position.step + 1}", notify)
                    oom_resplits += 1
                    graphs = new_graphs() if graphs else None  # drop the old shapes' graphs and their memory
                    tc = config.train
                    config_yaml = config_to_yaml(config)
                    write_text_atomic(run_dir / "config.yaml", config_yaml)
                    continue
                step_tokens = int(sum_across(ctx, sum(real_tokens(b) for b in group)))
                log_tokens += step_tokens
                scaler.unscale_(optimizer)
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))))
                finite = math.isfinite(grad_norm) and math.isfinite(step_loss)
                if finite or precision.loss_scaling:
                    scaler.step(optimizer)  # the fp16 scaler skips a non-finite step itself and lowers its scale
                scaler.update()
                optimizer.zero_grad(set_to_none=False)
                scheduler.step()
                nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
                position.skipped_steps += not finite
                position.step += 1
                position.rows_in_epoch += len(step_rows)
                position.tokens_trained += step_tokens

                eval_due = bool(config.eval.every_steps) and position.step % config.eval.every_steps == 0
                if position.step % tc.log_every == 0 or position.step == total_steps or not finite or eval_due:
                    now = time.perf_counter()
                    row = {"step": position.step,
                           "epoch": round(position.epoch + position.rows_in_epoch / len(rows), 4),
                           "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": log_tokens / max(now - log_time, 1e-9),
                           "memory_bytes": _current_memory(device), "skipped_steps": position.skipped_steps}
                    if eval_due and position.step < total_steps and held_out and evaluates:
                        row["eval_loss"] = evaluate()[0]
                    log.write(row)
                    progress.update(position.step, step_loss, row["tokens_per_s"], row["memory_bytes"])
                    log_tokens, log_time = 0, now
                if nonfinite_in_a_row >= tc.max_nonfinite_steps:
                    progress.close()
                    kept = complete_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"training diverged: {nonfinite_in_a_row} consecutive steps with a non-finite loss or "
                        f"gradient (up to step {position.step}); "
                        + (f"the last good checkpoint {kept[-1]} is kept; " if kept else "")
                        + "lower train.lr, or use bf16 instead of fp16")
                if stop.requested:
                    break
                # no periodic checkpoint inside a run of non-finite steps: the last one kept stays a good one
                if position.step % config.save.every_steps == 0 and position.step < total_steps and finite:
                    checkpoint()
            if len(rows) - position.rows_in_epoch < ctx.world_size:
                position.epoch += 1
                position.rows_in_epoch = 0
    progress.close()
    checkpoint()
    if stop.requested and position.step < total_steps:
        raise TrainingInterrupted(f"{stop.requested} at step {position.step}: checkpoint saved in "
                                  f"{run_dir / 'checkpoints'}; run the same command to resume")

    # --- after: evaluation and artifacts ----------------------------------------------------------
    eval_loss_after, eval_tokens = evaluate() if evaluates else (nan, 0)
    log.write({"step": position.step, "epoch": float(position.epoch), "eval_loss": eval_loss_after})
    log.close()
    whole = trainable_state(model) if fsdp else None  # FSDP: every process gathers its shards
    if ctx.is_main:
        save_model_artifacts(run_dir, model, tokenizer, resolved.path, config.uses_lora, whole)
    train_losses = [m["loss"] for m in log.rows if "loss" in m]
    summary = {
        "model": config.model, "base_model_path": str(resolved.path), "method": config.method,
        "train_loss_final": train_losses[-1] if train_losses else None,
        "train_loss_final_mean10": sum(train_losses[-10:]) / len(train_losses[-10:]) if train_losses else None,
        "eval_loss_before": eval_loss_before, "eval_loss_after": eval_loss_after, "eval_tokens": eval_tokens,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda max_memory_reserved" if device.type == "cuda" else "process peak RSS",
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - started, "steps": position.step,
        "skipped_steps": position.skipped_steps, "tokens_trained": position.tokens_trained,
        "trainable_params": trainable_params, "total_params": total_params, "precision": precision.name,
        "device": device_description(device), "versions": versions(), "data": asdict(data.report),
        "resumed_from": str(resumed_from) if resumed_from else None, "world_size": ctx.world_size,
        "plan": planned, "oom_resplits": oom_resplits, "speedups": asdict(speedups),
        "cuda_graphs": ({"shapes": len(graphs.graphs), "failure": graphs.failure} if graphs else None),
        "data_parallel": ("fsdp" if fsdp else "ddp") if ctx.enabled else None,
        "frozen_weight_bytes_per_process": frozen_bytes,
        "micro_batch": config.train.micro_batch, "grad_accum": config.train.grad_accum,
    }
    if ctx.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        plot_losses(run_dir, log.rows)
    barrier(ctx)
    return summary


def _current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_memory_bytes(device)
