"""The training recipe, read top to bottom in the manner of torchtune's recipes:

    set_up (device, data, plan, model, optimizer, probe) -> resume -> held-out loss before
    -> train_loop (per optimizer step: engine.step's accumulate_gradients and optimizer_step, log,
       checkpoint) -> final checkpoint -> finish (held-out loss after, artifacts, summary.json).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple
from functools import partial
from math import nan
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from snugtune.attention import varlen_usable
from snugtune.config import RESUME_LENGTH_FIELDS, RESUME_SAFE_FIELDS, Config, changed_fields, config_to_yaml
from snugtune.data.batches import (GPU_PAD_MULTIPLE, collate_micro_batch, epoch_rows, eval_batches, real_tokens,
                                   trained_tokens_per_row)
from snugtune.data.prepare import PreparedData, prepare_data
from snugtune.data.report import report_lines
from snugtune.engine.checkpoint import (TrainPosition, checkpoint_metrics, load_checkpoint, save_checkpoint,
                                        trainable_state)
from snugtune.engine.distributed import (SINGLE, DistContext, barrier, local_bytes, shard_with_fsdp, start, step_share,
                                         sum_across)
from snugtune.engine.graphs import StepGraphs
from snugtune.engine.machine import device_description, peak_memory_bytes, versions
from snugtune.engine.offload import ActivationOffload, WeightStreamer, keep_embeddings_on_host
from snugtune.engine.optim import build_optimizer, build_scheduler, flatten_trainable
from snugtune.engine.progress import TrainProgress
from snugtune.engine.signals import StopRequests
from snugtune.engine.speedups import Speedups, apply_speedups, compile_wanted
from snugtune.engine.step import StepResult, accumulate_gradients, optimizer_step
from snugtune.engine.tiling import tile_for_long_rows
from snugtune.errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError
from snugtune.lora_dropout import start_lora_dropout_step
from snugtune.loss import LossModule, mean_loss, token_loss_sum
from snugtune.memory_rules import CUDA_CONTEXT_BYTES
from snugtune.methods import METHODS
from snugtune.trackers import open_trackers
from snugtune.models.cache import default_cache_dir
from snugtune.models.load import (check_vocab, count_parameters, decoder_layers, load_base_model, load_tokenizer,
                                  prepare_for_training)
from snugtune.models.resolve import resolve_model
from snugtune.planner import Plan, needs_new_model, plan_run, planned_figures, step_down
from snugtune.planner.cards import budget_bytes
from snugtune.precision import Precision, resolve_device, resolve_precision
from snugtune.rundir import MetricsLog, RunFolder, plot_losses, save_model_artifacts


@dataclass
class Run:
    """What set_up builds and the loop uses. `config`, `plan` and `graphs` change when an OOM steps down."""
    asked: Config                # the config as given, which the planner plans from
    config: Config
    ctx: DistContext
    device: torch.device
    precision: Precision
    notify: object
    run_dir: Path
    base_path: Path
    tokenizer: object
    data: PreparedData
    packed_len: int | None
    first_epoch_rows: list
    trained_per_row: list        # trained positions of each first-epoch row, as the planner sized the loss
    masked: bool                 # batches carry a dense attention mask (packed rows, no varlen kernel)
    plan: Plan | None            # None without a card to plan for (the CPU under budget: auto)
    step_downs: list             # the notice of each step down after an OOM, in order
    model: torch.nn.Module
    fsdp_root: torch.nn.Module | None
    stepper: torch.nn.Module     # what a micro-batch is fed to: the model, DDP(LossModule) or the FSDP root
    speedups: Speedups
    offload: ActivationOffload | None
    counts: dict                 # parameters trained / in all, frozen bytes per process
    batch_of: object             # rows -> a collated micro-batch
    pad_multiple: int            # lengths rounded up to a multiple of this (GPU: fewer, aligned shapes)
    held_out: list
    # set by _build_optimizer
    params: list = field(default_factory=list)
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    graphs: StepGraphs | None = None
    total_steps: int = 0
    rows_per_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0  # training time of the invocations before this one, to their last checkpoint

    @property
    def evaluates(self) -> bool:  # with FSDP every process takes part (the weights are sharded); rank 0 reports
        return self.ctx.is_main or self.fsdp_root is not None

    @property
    def evaluator(self) -> torch.nn.Module:
        return self.fsdp_root if self.fsdp_root is not None else self.model


def train(config: Config, show_progress: bool = True, notify=lambda message: None, ctx: DistContext = SINGLE) -> dict:
    """Fine-tune per `config`, resuming from output_dir's newest complete checkpoint. Returns summary.json's dict.

    `notify(str)` receives one-line notices (resuming, schedule changes). SIGINT/SIGTERM finish the current
    step, save a checkpoint and raise TrainingInterrupted. Under torchrun (ctx from
    engine.distributed.context_from_env) each process trains on its share of every step's rows through
    PyTorch's DDP or FSDP; only rank 0 writes metrics, checkpoints and artifacts.
    """
    started = time.perf_counter()
    stepped = None
    while True:  # an OOM that needs another model: build it and resume from the checkpoint the loop wrote
        try:
            return _train_attempt(config, notify if ctx.is_main else (lambda message: None), ctx, show_progress,
                                  started, stepped)
        except SteppedDown as change:
            stepped = change.run
        gc.collect()  # the failed attempt's model and optimizer, before the next is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


Stepped = tuple[Config, Plan | None, list[str]]  # after a step down: the config to train with, its plan, the notices


class SteppedDown(Exception):
    """Raised out of a training attempt when an out-of-memory error needs a model built with other settings
    (offload, checkpointing, tiling)."""

    def __init__(self, run: Stepped):
        super().__init__("stepped down")
        self.run = run


def _train_attempt(config: Config, notify, ctx: DistContext, show_progress: bool, started: float,
                   stepped: Stepped | None) -> dict:
    """set_up -> resume -> the loop -> finish, as planned or with the settings a step down chose."""
    run = set_up(config, notify, ctx, stepped)
    # after a step down the checkpoint the failed attempt wrote already counts the time before it
    run.started = started if stepped is None else time.perf_counter()
    position, log, resumed_from = resume(run)
    eval_loss_before = held_out_loss_before(run, log)
    stopped = train_loop(run, position, log, show_progress and ctx.is_main)
    save_checkpoint_now(run, position, log)
    if stopped and position.step < run.total_steps:
        raise TrainingInterrupted(f"{stopped} at step {position.step}: checkpoint saved in "
                                  f"{run.run_dir / 'checkpoints'}; run the same command to resume")
    return finish(run, position, log, eval_loss_before, resumed_from, started)


# --- set up --------------------------------------------------------------------------------------

def set_up(config: Config, notify, ctx: DistContext, stepped: Stepped | None = None) -> Run:
    """Device, data, the memory plan (or the one a step down chose), the model, the optimizer; then one probe
    step on a GPU."""
    run_dir = Path(config.output_dir)
    _prepare_run_dir(run_dir)
    device = _device_for(config, ctx)
    precision = resolve_precision(config.train.precision, device)
    resolved = resolve_model(config.model, allow_pickle=config.allow_pickle_weights)
    if device.type == "cuda":  # building a shape model on the GPU is not part of the run's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer = load_tokenizer(resolved.path, config.trust_remote_code)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.train.seed,
                        cache_dir=default_cache_dir() / "data")
    for line in report_lines(data.report):
        notify(line)
    packed_len = config.max_seq_len if config.data.packing else None
    first_epoch_rows = epoch_rows(data.train, config.train.seed, 0, packed_len)
    # padded batches and packed rows of one sample each run unmasked causal attention; packed rows of several
    # samples build a dense mask only where varlen flash attention cannot run
    masked = config.data.packing and not varlen_usable(device) and any(len(row) > 1 for row in first_epoch_rows)
    asked, trained_per_row = config, trained_tokens_per_row(first_epoch_rows)
    _cap_memory(config, device, notify)
    if stepped is None:
        config, plan = plan_run(asked, trained_per_row, ctx.world_size, masked, device.type == "cuda", notify)
        step_downs: list[str] = []
    else:
        config, plan, step_downs = stepped
    torch.manual_seed(config.train.seed)
    built = _build_model(config, ctx, device, precision, notify, resolved.path, tokenizer)
    pad_multiple = GPU_PAD_MULTIPLE if device.type == "cuda" else 1  # lengths rounded up on a GPU; exact on CPU
    run = Run(asked=asked, config=config, ctx=ctx, device=device, precision=precision, notify=notify,
              run_dir=run_dir, base_path=resolved.path, tokenizer=tokenizer, data=data, packed_len=packed_len,
              first_epoch_rows=first_epoch_rows, trained_per_row=trained_per_row, masked=masked, plan=plan,
              step_downs=step_downs, model=built.model, fsdp_root=built.fsdp_root,
              stepper=built.stepper, speedups=built.speedups, offload=built.offload, counts=built.counts,
              batch_of=partial(collate_micro_batch, pad_id=tokenizer.pad_token_id, packed=config.data.packing,
                               pad_multiple=pad_multiple, max_len=config.max_seq_len),
              pad_multiple=pad_multiple, held_out=held_out_batches(config, data.eval, tokenizer.pad_token_id, pad_multiple))
    _build_optimizer(run)
    if device.type == "cuda" and not ctx.enabled:
        _probe_until_it_fits(run)
    return run


def held_out_batches(config: Config, samples: list, pad_id: int, pad_multiple: int) -> list:
    """The held-out batches, none larger in tokens than a training micro-batch (what the plan fits)."""
    return eval_batches(samples, config.eval.batch_size, pad_id, pad_multiple, config.max_seq_len,
                        max_tokens=config.micro_batch_tokens)[: config.eval.max_batches]


def _device_for(config: Config, ctx: DistContext) -> torch.device:
    device = resolve_device(config.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    start(ctx, device)
    return device


class BuiltModel(NamedTuple):
    model: torch.nn.Module
    fsdp_root: torch.nn.Module | None
    stepper: torch.nn.Module
    speedups: Speedups
    offload: ActivationOffload | None
    counts: dict


def _build_model(config: Config, ctx: DistContext, device: torch.device, precision: Precision, notify,
                 base_path: Path, tokenizer) -> BuiltModel:
    """The base loaded as the method stores it, LoRA or trainable blocks attached, the memory policies
    (weight streaming, host embeddings, MLP tiling, activation offload) and speedups applied, and FSDP or
    DDP around it under torchrun."""
    stream = config.offload.weights is True
    fsdp = _use_fsdp(config, ctx, stream)
    model = load_base_model(base_path, config, device, precision.compute_dtype, load_on_cpu=stream or fsdp,
                            shardable=fsdp)
    check_vocab(model, tokenizer, config.model)
    model = prepare_for_training(model, config)
    layers = decoder_layers(model)
    if stream:  # frozen block weights stay in host memory, one block ahead on the device
        WeightStreamer(layers, device).attach(model)
    if config.offload.embeddings is True and not fsdp and not stream:
        if not keep_embeddings_on_host(model, device):
            notify("offload.embeddings: the input embeddings are trained or tied to the output head; kept on the GPU")
    # long contexts: one MLP tile's intermediates at a time, one group of heads' gradients, lean norms
    tile_for_long_rows(model, layers, config.train.tiled_mlp is True,
                       compile_wanted(config, device, ctx.enabled, stream))
    speedups = apply_speedups(model, layers, config, device, precision.compute_dtype, ctx.enabled, stream, fsdp)
    model.train()
    trainable, total = count_parameters(model)
    # loaded on the CPU: FSDP moves each unit to this process's GPU as it shards it (4-bit scales included)
    root = shard_with_fsdp(model, layers, token_loss_sum) if fsdp else None
    if root is not None:
        stepper = root
    elif ctx.enabled:  # static_graph: reentrant checkpointing runs each block's backward twice through autograd
        stepper = DDP(LossModule(model, token_loss_sum), device_ids=[device.index] if device.type == "cuda" else None,
                      static_graph=config.train.grad_checkpointing is True)
    else:
        stepper = model
    counts = {"trainable_params": trainable, "total_params": total,
              "frozen_weight_bytes_per_process": sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)}
    offload = ActivationOffload() if config.offload.activations is True else None
    return BuiltModel(model, root, stepper, speedups, offload, counts)


def _build_optimizer(run: Run) -> None:
    """Optimizer, schedule over the run's steps, loss scaler, and the CUDA graphs (which need the scaler)."""
    fsdp = run.fsdp_root is not None
    if fsdp and run.config.train.optimizer != "adamw":
        run.notify(f"FSDP: LoRA is trained with torch AdamW (not {run.config.train.optimizer}: bitsandbytes' "
                   f"optimizers do not take sharded tensors); its state is small")
        run.config = _with_train(run.config, optimizer="adamw")
    tc = run.config.train
    run.rows_per_step = tc.micro_batch * tc.grad_accum * run.ctx.world_size
    steps_per_epoch = math.ceil(len(run.first_epoch_rows) / run.rows_per_step)
    run.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    run.params = [p for p in run.model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    # LoRA: one flat tensor for the optimizer, in one process or under DDP (whose reducer copies the averaged
    # gradients back into the views), so their checkpoints load into each other; FSDP shards per tensor
    if run.config.uses_lora and not fsdp and run.params:
        run.params = [flatten_trainable(run.params)]
    run.optimizer = build_optimizer(run.params, tc, run.device)
    run.scheduler = build_scheduler(run.optimizer, tc, run.total_steps)
    run.scaler = run.precision.grad_scaler()
    if fsdp and run.precision.loss_scaling:  # fp16 (T4): every process must agree on skipping a step
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        run.scaler = ShardedGradScaler(run.precision.device_type)
    run.graphs = _new_graphs(run) if run.speedups.cuda_graphs else None


def _new_graphs(run: Run) -> StepGraphs:
    return StepGraphs(run.model, run.device, run.precision, run.scaler)


def _probe_until_it_fits(run: Run) -> None:
    """Probe before the first step; on an OOM step down to the planner's next plan and probe again."""
    while True:
        try:
            _probe(run)
            return
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if _step_down(run, "the probe step"):
                raise SteppedDown((run.config, run.plan, run.step_downs)) from None


def _probe(run: Run) -> None:
    """One full step on the longest micro-batch (optimizer state allocated, learning rate 0) and one eval
    batch, then everything put back: late OOMs come from exactly these, so they surface now."""
    rows, optimizer, scaler = run.first_epoch_rows, run.optimizer, run.scaler
    longest = sorted(rows, key=lambda row: -sum(len(s.input_ids) for s in row))[: run.config.train.micro_batch]
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        accumulate_gradients(run.model, [run.batch_of(longest)], run.precision, scaler, run.device,
                             offload=run.offload)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        scaler.step(optimizer)
        if run.held_out:
            mean_loss(run.model, [max(run.held_out, key=lambda b: b["input_ids"].numel())], run.precision, run.device)
    finally:
        optimizer.zero_grad(set_to_none=False)
        optimizer.state.clear()  # the first real step starts from fresh moments, as it would without a probe
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        if scaler.is_enabled():
            scaler.update(scaler.get_scale())  # close the probe's scaler step, keeping the scale
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state_all(rng[1])


WRITE_TEST = ".write-test-"  # the probe file each process writes to check output_dir is writable


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"output_dir: {run_dir} exists and is not a plain folder (a file or a link); choose another")
    run_signs = ("metrics.jsonl", "checkpoints", "summary.json")
    # another process of the same torchrun job may be writing its .write-test probe right now
    held = [p for p in run_dir.iterdir() if not p.name.startswith(WRITE_TEST)] if run_dir.is_dir() else []
    if held and not any((run_dir / sign).exists() for sign in run_signs):
        raise UserError(f"output_dir: {run_dir} holds files and is not a snugtune run (no metrics.jsonl, checkpoints "
                        f"or summary.json); choose a new or empty folder (nothing was changed)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{WRITE_TEST}{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None


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


def _cap_memory(config: Config, device: torch.device, notify) -> None:
    """On a GPU larger than the budget: cap this process's memory at the budget (simulate a smaller card)."""
    if device.type != "cuda" or config.budget == "auto":
        return
    budget, _, card = budget_bytes(config.budget)
    total = torch.cuda.get_device_properties(device).total_memory
    if budget < total:  # the smaller card's CUDA context is outside the allocator but inside its memory
        torch.cuda.set_per_process_memory_fraction((budget - CUDA_CONTEXT_BYTES) / total, device)
        notify(f"memory capped at {budget / 2**30:.1f} GiB ({card}) of this {total / 2**30:.0f} GiB GPU")


def _step_down(run: Run, where: str) -> bool:
    """The planner's next plan after an OOM, announced and recorded in run; True when it needs a new model
    (the caller raises SteppedDown), else the loop carries on with a new split or without CUDA graphs."""
    new, run.plan, notice = step_down(run.asked, run.config, run.plan, where, run.trained_per_row, run.masked)
    run.notify(notice)
    run.step_downs.append(notice)
    rebuild = needs_new_model(run.config, new)
    run.config = new
    if rebuild:  # the new model's set_up makes its own held-out batches and graphs
        return True
    run.held_out = held_out_batches(new, run.data.eval, run.tokenizer.pad_token_id, run.pad_multiple)
    if run.graphs is not None:  # drop the old shapes' graphs and their memory pool
        run.graphs.release("stepped down after running out of memory")
        run.graphs = _new_graphs(run) if new.train.cuda_graphs is not False else None
    return False


# --- resume --------------------------------------------------------------------------------------

def resume(run: Run) -> tuple[TrainPosition, MetricsLog, Path | None]:
    """The position to start from (the newest complete checkpoint's, or the start), the metrics log with the
    rows logged up to it, and that checkpoint. Writes the run's config.yaml."""
    folder = RunFolder(run.run_dir)
    position = TrainPosition(rows_per_step=run.rows_per_step)
    metrics: list[dict] = []
    checkpoints = folder.checkpoints()
    resumed_from = checkpoints[-1] if checkpoints else None
    if resumed_from is not None:
        _check_resume_config(resumed_from, run.config, run.rows_per_step, run.notify)
        position = load_checkpoint(resumed_from, run.model, run.optimizer, run.scheduler, run.scaler, run.notify)
        position.rows_per_step = run.rows_per_step
        run.earlier_seconds = position.run_seconds
        metrics = checkpoint_metrics(resumed_from)  # rows logged after it are re-done
        run.notify(f"resuming from {resumed_from} (step {position.step} of {run.total_steps})")
    log = MetricsLog(run.run_dir, metrics, tensorboard=run.config.log.tensorboard, write=run.ctx.is_main,
                     trackers=open_trackers(run.config, run.run_dir, metrics) if run.ctx.is_main else None)
    if run.ctx.is_main:
        folder.write_config(config_to_yaml(run.config))
    return position, log, resumed_from


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


def held_out_loss_before(run: Run, log: MetricsLog) -> float:
    """The held-out loss before training: logged as step 0 once, read back from the log on a resume."""
    before = [m["eval_loss"] for m in log.rows if m["step"] == 0 and "eval_loss" in m]
    if before:
        return before[0]
    loss = evaluate(run)[0] if run.evaluates else nan
    log.write({"step": 0, "epoch": 0.0, "eval_loss": loss})
    return loss


def evaluate(run: Run) -> tuple[float, int]:
    """Held-out loss; if the CUDA graphs' memory pool leaves evaluation too little, drop the graphs."""
    try:
        return mean_loss(run.evaluator, run.held_out, run.precision, run.device)
    except torch.OutOfMemoryError:
        if run.graphs is None or not run.graphs.graphs:
            raise
        run.graphs.release("released: evaluation ran out of memory beside the graphs' memory pool")
        run.notify("CUDA graphs released to make room for evaluation; training continues without them")
        return mean_loss(run.evaluator, run.held_out, run.precision, run.device)


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """Counters the loop carries between steps: tokens and time since the last logged row, and the
    current run of non-finite steps."""
    log_tokens: int = 0
    log_time: float = field(default_factory=time.perf_counter)
    nonfinite_in_a_row: int = 0


def train_loop(run: Run, position: TrainPosition, log: MetricsLog, show_progress: bool) -> str | None:
    """Optimizer steps until the run's last, epoch after epoch; returns the signal's name if one stopped it."""
    progress = TrainProgress(run.total_steps, position.step, enabled=show_progress)
    state = LoopState()
    stop = StopRequests()
    try:
        with stop.installed():
            while position.step < run.total_steps and not stop.agreed:
                rows = epoch_rows(run.data.train, run.config.train.seed, position.epoch, run.packed_len)
                train_epoch(run, position, rows, log, progress, state, stop)
    finally:
        progress.close()
    return stop.agreed


def train_epoch(run: Run, position: TrainPosition, rows: list, log: MetricsLog, progress: TrainProgress,
                state: LoopState, stop: StopRequests) -> None:
    """Steps over the epoch's rows from position.rows_in_epoch; at the epoch's end, position moves to the next."""
    while position.rows_in_epoch < len(rows) and position.step < run.total_steps:
        result = one_step(run, position, rows, log, progress, state)
        stop.agree(run.ctx)  # a signal to any process stops every process after this same step
        if stop.agreed:
            break
        # no periodic checkpoint inside a run of non-finite steps: the last one kept stays a good one
        every = run.config.save.every_steps
        if result is not None and result.finite and position.step % every == 0 and position.step < run.total_steps:
            save_checkpoint_now(run, position, log)
    if position.rows_in_epoch >= len(rows):
        position.epoch += 1
        position.rows_in_epoch = 0


def one_step(run: Run, position: TrainPosition, rows: list, log: MetricsLog, progress: TrainProgress,
             state: LoopState) -> StepResult | None:
    """One optimizer step on the epoch's next rows: accumulate, step, log. An OOM re-splits the same rows
    into smaller micro-batches and returns None without advancing, so the loop retries them."""
    ctx, tc = run.ctx, run.config.train
    step_rows = rows[position.rows_in_epoch: position.rows_in_epoch + tc.micro_batch * tc.grad_accum * ctx.world_size]
    shares, padding = step_share(step_rows, ctx, tc.micro_batch)
    group = [run.batch_of(share) for share in shares]
    start_lora_dropout_step(run.model, position.step)  # masks keyed by the step: resume redraws them
    try:
        step_loss = accumulate_gradients(run.stepper, group, run.precision, run.scaler, run.device, ctx, run.offload,
                                         run.graphs, padding)
    except torch.OutOfMemoryError:
        if ctx.enabled:
            raise
        group.clear()  # free the batches before stepping down
        _step_down_after_oom(run, position, log)
        return None
    step_tokens = int(sum_across(ctx, sum(real_tokens(b) for b in group[:len(group) - padding])))
    result = optimizer_step(run.optimizer, run.scheduler, run.scaler, run.params, tc.max_grad_norm, step_loss,
                            run.precision.loss_scaling)
    state.nonfinite_in_a_row = 0 if result.finite else state.nonfinite_in_a_row + 1
    state.log_tokens += step_tokens
    position.skipped_steps += not result.finite
    position.step += 1
    position.rows_in_epoch += len(step_rows)
    position.tokens_trained += step_tokens
    _log_step(run, position, rows, log, progress, state, step_loss, result)
    if state.nonfinite_in_a_row >= tc.max_nonfinite_steps:
        _raise_diverged(run, position, state)
    return result


def _step_down_after_oom(run: Run, position: TrainPosition, log: MetricsLog) -> None:
    """Free what the failed step held and step down; a step down that needs another model checkpoints this
    position first (train() builds the model and resumes from it), so the run carries on from this step."""
    run.optimizer.zero_grad(set_to_none=False)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    old_yaml = config_to_yaml(run.config)
    if _step_down(run, f"step {position.step + 1}"):
        save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, run.scaler, position,
                        run.config.save.keep, log.rows, old_yaml)
        raise SteppedDown((run.config, run.plan, run.step_downs)) from None
    RunFolder(run.run_dir).write_config(config_to_yaml(run.config))


def _log_step(run: Run, position: TrainPosition, rows: list, log: MetricsLog, progress: TrainProgress,
              state: LoopState, step_loss: float, result: StepResult) -> None:
    """A metrics row every log_every steps, at the last step, at a non-finite step and where evaluation is due."""
    every = run.config.eval.every_steps
    eval_due = bool(every) and position.step % every == 0
    if not (position.step % run.config.train.log_every == 0 or position.step == run.total_steps
            or not result.finite or eval_due):
        return
    now = time.perf_counter()
    row = {"step": position.step, "epoch": round(position.epoch + position.rows_in_epoch / len(rows), 4),
           "loss": step_loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
           "tokens_per_s": state.log_tokens / max(now - state.log_time, 1e-9),
           "memory_bytes": _current_memory(run.device), "skipped_steps": position.skipped_steps}
    if eval_due and position.step < run.total_steps and run.held_out and run.evaluates:
        row["eval_loss"] = evaluate(run)[0]
    log.write(row)
    progress.update(position.step, step_loss, row["tokens_per_s"], row["memory_bytes"])
    state.log_tokens, state.log_time = 0, now


def _raise_diverged(run: Run, position: TrainPosition, state: LoopState) -> None:
    kept = RunFolder(run.run_dir).checkpoints()
    raise TrainingDiverged(
        f"training diverged: {state.nonfinite_in_a_row} consecutive steps with a non-finite loss or gradient "
        f"(up to step {position.step}); " + (f"the last good checkpoint {kept[-1]} is kept; " if kept else "")
        + "lower train.lr, or use bf16 instead of fp16")


def save_checkpoint_now(run: Run, position: TrainPosition, log: MetricsLog) -> None:
    position.run_seconds = run.earlier_seconds + time.perf_counter() - run.started
    if run.ctx.is_main or run.fsdp_root is not None:  # FSDP: every process gathers its shards, rank 0 writes
        save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, run.scaler, position,
                        run.config.save.keep, log.rows, config_to_yaml(run.config), write=run.ctx.is_main)
    barrier(run.ctx)


def _current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_memory_bytes(device)


# --- finish --------------------------------------------------------------------------------------

def finish(run: Run, position: TrainPosition, log: MetricsLog, eval_loss_before: float, resumed_from: Path | None,
           started: float) -> dict:
    """Held-out loss after training, the adapter (or trained model), summary.json and loss.png."""
    eval_loss_after, eval_tokens = evaluate(run) if run.evaluates else (nan, 0)
    log.write({"step": position.step, "epoch": float(position.epoch), "eval_loss": eval_loss_after})
    log.close()
    whole = trainable_state(run.model) if run.fsdp_root is not None else None  # FSDP: every process gathers
    if run.ctx.is_main:
        save_model_artifacts(run.run_dir, run.model, run.tokenizer, run.base_path, run.config.uses_lora, whole)
    summary = _summary(run, position, log, eval_loss_before, (eval_loss_after, eval_tokens), resumed_from, started)
    if run.ctx.is_main:
        RunFolder(run.run_dir).write_summary(summary)
        plot_losses(run.run_dir, log.rows)
    barrier(run.ctx)
    return summary


def _summary(run: Run, position: TrainPosition, log: MetricsLog, eval_loss_before: float,
             after: tuple[float, int], resumed_from: Path | None, started: float) -> dict:
    config, device, graphs = run.config, run.device, run.graphs
    losses = [m["loss"] for m in log.rows if "loss" in m]
    return {
        "model": config.model, "base_model_path": str(run.base_path), "method": config.method,
        "train_loss_final": losses[-1] if losses else None,
        "train_loss_final_mean10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_loss_before": eval_loss_before, "eval_loss_after": after[0], "eval_tokens": after[1],
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda max_memory_reserved" if device.type == "cuda" else "process peak RSS",
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - started, "steps": position.step,
        "run_wall_seconds": run.earlier_seconds + time.perf_counter() - run.started,
        "skipped_steps": position.skipped_steps, "tokens_trained": position.tokens_trained,
        "trainable_params": run.counts["trainable_params"], "total_params": run.counts["total_params"],
        "precision": run.precision.name, "device": device_description(device), "versions": versions(),
        "data": asdict(run.data.report), "resumed_from": str(resumed_from) if resumed_from else None,
        "world_size": run.ctx.world_size, "plan": planned_figures(run.plan, run.ctx.world_size),
        "oom_resplits": len(run.step_downs), "step_downs": run.step_downs,
        "speedups": asdict(run.speedups),
        "cuda_graphs": ({"shapes": len(graphs.graphs), "failure": graphs.failure} if graphs else None),
        "data_parallel": ("fsdp" if run.fsdp_root is not None else "ddp") if run.ctx.enabled else None,
        "frozen_weight_bytes_per_process": run.counts["frozen_weight_bytes_per_process"],
        "micro_batch": config.train.micro_batch, "grad_accum": config.train.grad_accum,
    }
