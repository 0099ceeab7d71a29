"""What a plan describes, built: the model (loaded as the method stores it, with its memory policies and
speedups), wrapped for several processes, and its optimizer, schedule, loss scaler and CUDA graphs.

Nothing here decides: every choice is read from the plan (planner.plan.Plan). A training invocation holds one
Job (what does not change: the device, the data, the config as asked) and a Run per plan it trains with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from snugtune.config import Config
from snugtune.data.prepare import PreparedData
from snugtune.engine import reference
from snugtune.engine.distributed import DistContext, local_bytes, shard_with_fsdp
from snugtune.engine.graphs import StepGraphs
from snugtune.engine.offload import ActivationOffload, WeightStreamer, keep_embeddings_on_host
from snugtune.engine.optim import build_optimizer, build_scheduler, flatten_trainable
from snugtune.engine.speedups import Speedups, apply_speedups
from snugtune.engine.tiling import tile_for_long_rows
from snugtune.loss import LossModule, token_loss_sum
from snugtune.models.load import check_vocab, count_parameters, decoder_layers, load_base_model, prepare_for_training
from snugtune.objectives import TrainingObjective
from snugtune.planner.inventory import Inventory
from snugtune.planner.plan import Plan
from snugtune.precision import Precision


@dataclass
class Job:
    """What one training invocation holds whatever the plan: set up once, before the first plan is built."""
    asked: Config                # the config as given, which the planner plans from
    ctx: DistContext
    device: torch.device
    precision: Precision
    notify: object               # notify(str): one-line notices
    run_dir: Path
    base_path: Path              # the base model's local folder
    tokenizer: object
    data: PreparedData
    objective: TrainingObjective  # how the run trains (sft, dpo, orpo, kto), without a reference copy
    inventory: Inventory         # what the base model's memory depends on (the planner's input)
    packed_len: int | None       # rows packed to this many tokens (None: padded batches)
    first_epoch_rows: list
    trained_per_row: list        # trained positions of each first-epoch row, as the planner sized the loss
    masked: bool                 # batches carry a dense attention mask (memory_rules.rows_masked)
    pad_multiple: int            # lengths rounded up to a multiple of this (GPU: fewer, aligned shapes)
    started: float                # when this invocation began (its wall time counts from here)
    step_downs: list = field(default_factory=list)  # the notice of each step down after an OOM, in order
    accept_new_data: bool = False  # resume even where the data's content changed since the checkpoint


@dataclass
class Run:
    """A plan built: what the training loop steps. `plan` and `graphs` change when an OOM steps down in place."""
    job: Job
    plan: Plan
    model: torch.nn.Module
    fsdp_root: torch.nn.Module | None
    stepper: torch.nn.Module     # what a micro-batch is fed to: the model, DDP(LossModule) or the FSDP root
    speedups: Speedups
    offload: ActivationOffload | None
    counts: dict                 # parameters trained / in all, frozen bytes per process
    params: list
    optimizer: object
    scheduler: object
    scaler: object
    graphs: StepGraphs | None
    total_steps: int
    rows_per_step: int
    held_out: list
    objective: TrainingObjective  # the job's, with the reference copy where the plan holds one
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0  # training time of the invocations before this one, to their last checkpoint

    @property
    def config(self) -> Config:
        return self.plan.config

    @property
    def evaluator(self) -> torch.nn.Module:
        return self.fsdp_root if self.fsdp_root is not None else self.model

    def batch_of(self, rows: list) -> dict[str, torch.Tensor]:
        """A micro-batch of rows, collated as the run trains them."""
        job = self.job
        return self.objective.collate(rows, job.tokenizer.pad_token_id, self.config.data.packing, job.pad_multiple,
                                      self.config.max_seq_len)


def build_run(job: Job, plan: Plan) -> Run:
    """The model, optimizer, schedule, scaler and graphs of `plan`."""
    torch.manual_seed(plan.config.train.seed)
    model, fsdp_root, stepper, speedups, counts = build_model(job, plan)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    # LoRA: one flat tensor for the optimizer, in one process or under DDP (whose reducer copies the averaged
    # gradients back into the views), so their checkpoints load into each other; FSDP shards per tensor
    if plan.config.uses_lora and fsdp_root is None and params:
        params = [flatten_trainable(params)]
    tc = plan.config.train
    rows_per_step = tc.micro_batch * tc.grad_accum * job.ctx.world_size
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * math.ceil(len(job.first_epoch_rows) / rows_per_step)))
    optimizer = build_optimizer(params, tc, job.device)
    scaler = job.precision.grad_scaler()
    if fsdp_root is not None and job.precision.loss_scaling:  # fp16 (T4): every process must agree on skipping
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(job.precision.device_type)
    objective = build_reference(job, plan, model)  # before the held-out batches: they carry its log-probabilities
    graphs = new_graphs(job, model, scaler, objective) if plan.decisions.cuda_graphs else None
    return Run(job, plan, model, fsdp_root, stepper, speedups,
               ActivationOffload() if plan.decisions.offload_activations else None, counts, params, optimizer,
               build_scheduler(optimizer, tc, total_steps), scaler, graphs, total_steps, rows_per_step,
               held_out_batches(job, plan.config), objective)


def build_reference(job: Job, plan: Plan, model: torch.nn.Module) -> TrainingObjective:
    """The job's objective with the reference the plan says (memory_rules.reference_for): a frozen copy of the
    base, or the examples' reference log-probabilities computed now, by the model just built (the base). An
    adapter's reference needs nothing built: the model with its adapter disabled."""
    if plan.decisions.reference == "copy":
        return replace(job.objective, reference_model=reference.frozen_copy(
            job.base_path, plan.config, job.device, job.precision.compute_dtype))
    if plan.decisions.reference == "precomputed":
        reference.precompute(job.objective, model, job.data, job.run_dir, job.base_path, job.tokenizer.pad_token_id,
                             job.precision, job.device, job.notify)
    return job.objective


def build_model(job: Job, plan: Plan) -> tuple:
    """The base loaded as the method stores it, LoRA or trainable blocks attached, the memory policies (weight
    streaming, host embeddings, MLP tiling, activation offload) and speedups applied, and FSDP or DDP around it
    under torchrun. Returns (model, FSDP root or None, what micro-batches are fed to, speedups, counts)."""
    d, config = plan.decisions, plan.config
    fsdp = d.shards > 1
    model = load_base_model(job.base_path, config, job.device, job.precision.compute_dtype,
                            load_on_cpu=d.stream_weights or fsdp, shardable=fsdp)
    check_vocab(model, job.tokenizer, config.model)
    model = prepare_for_training(model, config)
    layers = decoder_layers(model)
    if d.embeddings_on_host and not keep_embeddings_on_host(model, job.device):
        job.notify("offload.embeddings: the input embeddings are trained or tied to the output head; kept on the GPU")
    if d.stream_weights:  # frozen block weights stay in host memory, one block ahead on the device
        WeightStreamer(layers, job.device).attach(model)
    tile_for_long_rows(model, layers, d)  # long contexts: MLP tiles, one group of heads' gradients, lean norms
    model.train()
    trainable, total = count_parameters(model)
    # loaded on the CPU: FSDP moves each unit to this process's GPU as it shards it (4-bit scales included)
    root = shard_with_fsdp(model, layers, token_loss_sum) if fsdp else None
    # after sharding: a block compiles at its first call, around FSDP's hooks (dynamo-disabled: they run eagerly)
    speedups = apply_speedups(model, layers, d, job.precision.compute_dtype, config.train.compile_backend)
    if root is not None:
        stepper = root
    elif job.ctx.enabled:  # static_graph: reentrant checkpointing runs each block's backward twice through autograd
        stepper = DDP(LossModule(model, token_loss_sum),
                      device_ids=[job.device.index] if job.device.type == "cuda" else None,
                      static_graph=d.grad_checkpointing)
    else:
        stepper = model
    counts = {"trainable_params": trainable, "total_params": total,
              "frozen_weight_bytes_per_process": sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)}
    return model, root, stepper, speedups, counts


def new_graphs(job: Job, model: torch.nn.Module, scaler, objective: TrainingObjective) -> StepGraphs:
    return StepGraphs(model, job.device, job.precision, scaler, objective=objective)


def held_out_batches(job: Job, config: Config) -> list:
    """The held-out batches, none larger in tokens than a training micro-batch (what the plan fits)."""
    return job.objective.held_out_batches(job.data.eval, config.eval.batch_size, job.tokenizer.pad_token_id,
                                          job.pad_multiple, config.max_seq_len, config.micro_batch_tokens
                                          )[: config.eval.max_batches]
