"""The plan applied: the one place that turns the config a user asked for into the Config a run trains with,
before the first step and again after an out-of-memory error (a step down to the fastest plan the
planner predicts well below the one that failed)."""

from __future__ import annotations

from dataclasses import asdict

from snugtune.config import Config
from snugtune.errors import DoesNotFit
from snugtune.memory_rules import CUDA_CONTEXT_BYTES
from snugtune.planner.cards import GIB
from snugtune.planner.choose import SAFETY, Plan, plan_config, plan_for_budget
from snugtune.planner.explain import refusal, settings_text
from snugtune.planner.memory import ALLOCATOR_FIXED

STEP_DOWN = 0.95       # after an OOM, the next plan's predicted peak, less the fixed CUDA context and allocator
                       # reserve, is at most this share of the failed plan's
HELD_BELOW = ", held below the "  # how a step-down's budget is described, after the card's name
CPU_MICRO_BATCH = 4    # micro_batch: auto without a card to plan for: micro-batches of at most this many rows
LOOP_FIELDS = {"train.micro_batch", "train.grad_accum", "train.cuda_graphs"}  # changed without a new model


def _with(config: Config, train: dict, offload: dict | None = None, quant: dict | None = None) -> Config:
    update = {"train": config.train.model_copy(update=train)}
    if offload:
        update["offload"] = config.offload.model_copy(update=offload)
    if quant:
        update["quant"] = config.quant.model_copy(update=quant)
    return config.model_copy(update=update)


def run_config(asked: Config, plan: Plan) -> Config:
    """The Config a run trains with under `plan`: every field the planner chose set, none left 'auto'."""
    s = plan.settings
    train = {"micro_batch": s.micro_batch, "grad_accum": plan.grad_accum, "grad_checkpointing": s.grad_checkpointing,
             "checkpoint_layers": s.checkpointed_layers, "tiled_mlp": s.tiled_mlp}
    if "train.cuda_graphs" in plan.changes or asked.train.cuda_graphs is not True:
        train["cuda_graphs"] = "auto" if s.cuda_graphs else False
    if plan.gpus > 1:
        train["data_parallel"] = "fsdp" if s.shards > 1 else "ddp"
    offload = dict(zip(("embeddings", "activations", "weights"), plan.offload))
    return _with(asked, train, offload, {"dense_copy": s.dense_copy})


def config_without_card(asked: Config) -> Config:
    """No card to plan for (the CPU under budget: auto): checkpointing only where weights stream (which needs
    it), micro_batch: auto as the largest split of the rows up to CPU_MICRO_BATCH."""
    train = {}
    quant = {"dense_copy": False} if asked.quant.dense_copy == "auto" else None  # nothing to weigh it against
    if asked.train.grad_checkpointing == "auto":
        train["grad_checkpointing"] = asked.offload.weights is True
    if asked.train.micro_batch == "auto":
        rows = asked.train.step_rows
        mb = max(d for d in range(1, min(rows, CPU_MICRO_BATCH) + 1) if rows % d == 0)
        train.update(micro_batch=mb, grad_accum=rows // mb)
    return _with(asked, train, quant=quant)


def plan_run(asked: Config, trained_per_row: list[int], world_size: int = 1, masked: bool = True,
             on_gpu: bool = True, notify=lambda message: None) -> tuple[Config, Plan | None]:
    """Plan the run (knowing each row's trained positions, and whether batches carry an attention mask) and
    apply it: the Config to train with, and the plan (None without a card: the CPU under budget: auto).
    DoesNotFit, with the refusal's numbers, when nothing fits."""
    if not on_gpu and asked.budget == "auto":
        return config_without_card(asked), None
    plan = plan_config(asked, trained_per_row=trained_per_row, gpus=max(1, world_size), masked=masked)
    if not plan.fits:
        raise DoesNotFit(f"{refusal(plan)} (see `snugtune plan`)")
    for key, (was, chosen) in plan.changes.items():
        notify(f"planner: {key} = {chosen} (config: {was})")
    return run_config(asked, plan), plan


def planned_figures(plan: Plan | None, world_size: int = 1) -> dict | None:
    """The plan's figures for summary.json."""
    if plan is None:
        return None
    s = plan.settings
    return {"predicted_peak_bytes": plan.peak_bytes, "budget_bytes": plan.budget_bytes, "card": plan.card,
            "micro_batch": s.micro_batch, "grad_accum": plan.grad_accum,
            "predicted_step_seconds": plan.step_seconds,
            "grad_checkpointing": s.grad_checkpointing, "checkpoint_layers": s.checkpointed_layers,
            "offload_activations": s.offload_activations, "offload_weights": s.stream_weights,
            "offload_embeddings": s.embeddings_on_host, "tiled_mlp": s.tiled_mlp, "cuda_graphs": s.cuda_graphs,
            "dense_copy": s.dense_copy,
            "host_bytes": plan.host_bytes,
            "data_parallel": ("fsdp" if s.shards > 1 else "ddp") if world_size > 1 else None,
            "settings": {**asdict(s), "lora_targets": list(s.lora_targets)},  # the estimate's inputs, to recompute it
            "breakdown": {k.name.lower(): v for k, v in plan.breakdown.items()}}


def step_down(asked: Config, run: Config, failed: Plan | None, where: str, trained_per_row: list[int] | None = None,
              masked: bool = True) -> tuple[Config, Plan | None, str]:
    """After an out-of-memory error: the fastest plan for the same rows per step, with micro-batches no larger
    than the one that failed, predicted well below the failed plan's peak (see STEP_DOWN; smaller micro-batch,
    CUDA graphs released, input embeddings on the host, activation offload, weight streaming, more blocks
    recomputed, MLP tiling: whichever is fastest). Returns the Config, its plan and a notice; DoesNotFit
    when no plan is predicted that low."""
    if failed is None:  # no card planned for: only the split can change
        return _split_smaller(run, where)
    fixed = CUDA_CONTEXT_BYTES + ALLOCATOR_FIXED
    budget = int((fixed + STEP_DOWN * (failed.peak_bytes - fixed)) / SAFETY)
    card = f"{failed.card.split(HELD_BELOW)[0]}{HELD_BELOW}{failed.peak_bytes / GIB:.2f} GiB plan that ran out"
    plan = plan_for_budget(asked, budget, card, trained_per_row=trained_per_row, gpus=failed.gpus, masked=masked,
                           host_available=failed.host_available_bytes, most_micro=failed.settings.micro_batch,
                           suggest_cards=False)
    if not plan.fits:
        raise DoesNotFit(f"{where} ran out of memory with {settings_text(failed)}; {refusal(plan)}")
    new = run_config(asked, plan)
    changed = {k: v[1] for k, v in _differences(run, new).items()}
    notice = (f"{where} ran out of memory: stepped down to " + ", ".join(f"{k}={v}" for k, v in changed.items())
              + f" (predicted peak {failed.peak_bytes / GIB:.3f} -> {plan.peak_bytes / GIB:.3f} GiB, same rows "
              f"per step), continuing")
    return new, plan, notice


def _split_smaller(run: Config, where: str) -> tuple[Config, None, str]:
    tc = run.train
    rows = tc.micro_batch * tc.grad_accum
    smaller = [d for d in range(tc.micro_batch - 1, 0, -1) if rows % d == 0]
    if not smaller:
        raise DoesNotFit(f"{where} ran out of memory at micro_batch=1 with max_seq_len={run.max_seq_len}, and "
                         f"there is no card budget to plan other settings against: set budget (a card or NGiB) "
                         f"to let the planner offload, or lower max_seq_len")
    notice = (f"{where} ran out of memory: re-planned to micro_batch={smaller[0]} x grad_accum={rows // smaller[0]} "
              f"(same rows per step), continuing")
    return _with(run, {"micro_batch": smaller[0], "grad_accum": rows // smaller[0]}), None, notice


def _differences(old: Config, new: Config) -> dict[str, list]:
    """Dotted field -> [old, new] for the train, offload and quant fields that differ."""
    found = {}
    for section in ("train", "offload", "quant"):
        a, b = getattr(old, section).model_dump(), getattr(new, section).model_dump()
        found.update({f"{section}.{k}": [a[k], b[k]] for k in a if a[k] != b[k]})
    return found


def needs_new_model(old: Config, new: Config) -> bool:
    """Whether going from `old` to `new` changes the model (offload, checkpointing, tiling, dense copy), not just
    how the loop splits the rows or whether it replays graphs."""
    return any(k not in LOOP_FIELDS for k in _differences(old, new))
