"""The planner's answers to the engine: the plan a run starts with, and after an out-of-memory error the next
one (a step down to the fastest plan predicted well below the one that failed)."""

from __future__ import annotations

from dataclasses import asdict, replace

from snugtune.config import Config
from snugtune.errors import DoesNotFit
from snugtune.memory_rules import CUDA_CONTEXT_BYTES
from snugtune.planner.cards import GIB
from snugtune.planner.choose import decisions_for, plan_config, plan_for_budget
from snugtune.planner.explain import refusal, settings_text
from snugtune.planner.inventory import Inventory
from snugtune.planner.memory import allocator_fixed
from snugtune.planner.plan import SAFETY, Offload, Plan, planned_differences, resolved_config

STEP_DOWN = 0.95       # after an OOM, the next plan's predicted peak, less the fixed CUDA context and allocator
                       # reserve, is at most this share of the failed plan's
HELD_BELOW = ", held below the "  # how a step-down's budget is described, after the card's name
CPU_MICRO_BATCH = 4    # micro_batch: auto without a card to plan for: micro-batches of at most this many rows


def plan_without_card(asked: Config, inv: Inventory, gpus: int = 1) -> Plan:
    """No card to plan for (the CPU under budget: auto): the config as asked, where 'auto' means checkpointing
    only where weights stream (which needs it), no offload or tiling or dense copy, micro_batch: auto the
    largest split of the rows up to CPU_MICRO_BATCH, and several processes replicating the model unless
    FSDP is asked for."""
    tc = asked.train
    if tc.micro_batch == "auto":
        micro = max(d for d in range(1, min(tc.step_rows, CPU_MICRO_BATCH) + 1) if tc.step_rows % d == 0)
    else:
        micro = tc.micro_batch
    offload = Offload(*(getattr(asked.offload, name) is True for name in Offload._fields))
    checkpointing = offload.weights if tc.grad_checkpointing == "auto" else tc.grad_checkpointing
    decisions = decisions_for(asked, inv, micro, checkpointing, checkpointed_layers=tc.checkpoint_layers,
                              offload=offload, shards=gpus if tc.data_parallel == "fsdp" else 1, gpus=gpus,
                              tiled_mlp=tc.tiled_mlp is True, dense_copy=asked.quant.dense_copy is True, cuda=False)
    return Plan(resolved_config(asked, decisions), decisions, gpus=gpus, cuda=False)


def plan_run(asked: Config, inv: Inventory, trained_per_row: list[int], world_size: int = 1, masked: bool = True,
             cuda: bool = True, notify=lambda message: None, lengths_vary: bool = True) -> Plan:
    """The plan a run starts with, knowing each row's trained positions, whether batches carry an attention
    mask and whether the data's sequences pad to several lengths; without a card to plan for (the CPU under
    budget: auto) the config as asked. DoesNotFit, with the refusal's numbers, when nothing fits."""
    if not cuda and asked.budget == "auto":
        return plan_without_card(asked, inv, world_size)
    plan = plan_config(asked, trained_per_row=trained_per_row, gpus=max(1, world_size), masked=masked, inv=inv,
                       cuda=cuda, lengths_vary=lengths_vary)
    if not plan.fits:
        raise DoesNotFit(f"{refusal(plan)} (see `snugtune plan`)")
    for key, (was, chosen) in plan.changes.items():
        notify(f"planner: {key} = {chosen} (config: {was})")
    return plan


def planned_figures(plan: Plan) -> dict | None:
    """The plan's figures for summary.json (None when planned without a card)."""
    if plan.card is None:
        return None
    d = plan.decisions
    return {"predicted_peak_bytes": plan.peak_bytes, "budget_bytes": plan.budget_bytes, "card": plan.card,
            "micro_batch": d.micro_batch, "grad_accum": plan.grad_accum,
            "predicted_step_seconds": plan.step_seconds,
            "grad_checkpointing": d.grad_checkpointing, "checkpoint_layers": d.checkpointed_layers,
            "offload_activations": d.offload_activations, "offload_weights": d.stream_weights,
            "offload_embeddings": d.embeddings_on_host, "tiled_mlp": d.tiled_mlp, "cuda_graphs": d.cuda_graphs,
            "dense_copy": d.dense_copy,
            "host_bytes": plan.host_bytes,
            "data_parallel": d.data_parallel if plan.gpus > 1 else None,
            "settings": {**asdict(d), "lora_targets": list(d.lora_targets)},  # the estimate's inputs, to recompute it
            "breakdown": {k.name.lower(): v for k, v in plan.breakdown.items()}}


def step_down(asked: Config, failed: Plan, where: str, inv: Inventory, trained_per_row: list[int] | None = None,
              masked: bool = True) -> tuple[Plan, str]:
    """After an out-of-memory error: the fastest plan for the same rows per step, with micro-batches no larger
    than the one that failed, predicted well below the failed plan's peak (see STEP_DOWN; smaller micro-batch,
    CUDA graphs released, input embeddings on the host, activation offload, weight streaming, more blocks
    recomputed, MLP tiling: whichever is fastest). Returns the plan and a notice; DoesNotFit when no plan is
    predicted that low."""
    if failed.card is None:  # no card planned for: only the split can change
        return _split_smaller(failed, where)
    fixed = CUDA_CONTEXT_BYTES + allocator_fixed(failed.decisions)
    budget = int((fixed + STEP_DOWN * (failed.peak_bytes - fixed)) / SAFETY)
    card = f"{failed.card.split(HELD_BELOW)[0]}{HELD_BELOW}{failed.peak_bytes / GIB:.2f} GiB plan that ran out"
    plan = plan_for_budget(asked, budget, card, inv, trained_per_row=trained_per_row, gpus=failed.gpus,
                           masked=masked, host_available=failed.host_available_bytes,
                           most_micro=failed.decisions.micro_batch, suggest_cards=False, cuda=failed.cuda,
                           lengths_vary=failed.decisions.lengths_vary)
    if not plan.fits:
        raise DoesNotFit(f"{where} ran out of memory with {settings_text(failed)}; {refusal(plan)}")
    changed = {k: v[1] for k, v in planned_differences(failed.config, plan.config).items()}
    notice = (f"{where} ran out of memory: stepped down to " + ", ".join(f"{k}={v}" for k, v in changed.items())
              + f" (predicted peak {failed.peak_bytes / GIB:.3f} -> {plan.peak_bytes / GIB:.3f} GiB, same rows "
              f"per step), continuing")
    return plan, notice


def _split_smaller(failed: Plan, where: str) -> tuple[Plan, str]:
    d = failed.decisions
    rows = d.micro_batch * d.grad_accum
    smaller = [m for m in range(d.micro_batch - 1, 0, -1) if rows % m == 0]
    if not smaller:
        raise DoesNotFit(f"{where} ran out of memory at micro_batch=1 with max_seq_len={d.max_seq_len}, and "
                         f"there is no card budget to plan other settings against: set budget (a card or NGiB) "
                         f"to let the planner offload, or lower max_seq_len")
    decisions = replace(d, micro_batch=smaller[0], grad_accum=rows // smaller[0])
    notice = (f"{where} ran out of memory: re-planned to micro_batch={smaller[0]} x grad_accum={rows // smaller[0]} "
              f"(same rows per step), continuing")
    return replace(failed, config=resolved_config(failed.config, decisions), decisions=decisions), notice
