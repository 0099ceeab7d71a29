"""What the planner tells a person: the breakdown as a table whose rows add up to the peak it reports, and,
when nothing fits, the truth: the predicted peak, the budget it was held against with the reserve kept,
and the longest max_seq_len, the method and the card that do fit by the planner's own search."""

from __future__ import annotations

from dataclasses import replace

from snugtune.config import Config
from snugtune.methods import METHODS
from snugtune.planner.cards import CARDS, GIB
from snugtune.planner.choose import HOST_SAFETY, RunFacts, search
from snugtune.planner.inventory import Inventory
from snugtune.planner.memory import SHARDED_PARTS, Part, alive_at_peak
from snugtune.planner.plan import SAFETY, Decisions, Plan, offload_text

SEQ_STEP = 64          # sequence lengths are searched in steps of the GPU's padding multiple
BUDGET_STEP = GIB // 8  # card sizes are searched to an eighth of a GiB


def label(part: Part, s: Decisions) -> str:
    text = part.label
    if part is Part.OPTIMIZER_STATE:
        text = f"{text} ({s.optimizer})"
    if s.shards > 1 and part in SHARDED_PARTS:
        text = f"{text} (1/{s.shards} shard)"
    return f"host: {text}" if part.on_host else text


def _checkpointing_text(s: Decisions) -> str:
    if s.grad_checkpointing and s.checkpointed_layers is not None:
        return f"first {s.checkpointed_layers} blocks"
    return str(s.grad_checkpointing)


def settings_text(plan: Plan) -> str:
    s = plan.decisions
    return (f"method={s.method} micro_batch={s.micro_batch} grad_accum={plan.grad_accum} "
            f"max_seq_len={s.max_seq_len} grad_checkpointing={_checkpointing_text(s)} optimizer={s.optimizer} "
            f"lora r={s.lora_r} on {','.join(s.lora_targets)} offload={offload_text(plan.offload)} "
            f"cuda_graphs={s.cuda_graphs}" + (" tiled_mlp=True" if s.tiled_mlp else "")
            + (" dense_copy=True" if s.dense_copy else "")
            + (f" objective={s.objective} ({s.row_tokens} tokens a row) reference={s.reference}"
               if s.objective != "sft" else ""))


def format_plan(plan: Plan) -> str:
    """The breakdown as a table a person reads, like a VRAM budget: the rows alive at the peak add up to it;
    transients alive at other moments of the step and host memory are listed apart."""
    s = plan.decisions
    rows = {label(k, s): v for k, v in plan.breakdown.items()}
    width = max(len(k) for k in rows) + 2
    line = "-" * (width + 9)
    at_peak = alive_at_peak(plan.breakdown)
    lines = [f"{'at the peak':<{width}}{'GiB':>9}", line]
    lines += [f"{label(k, s):<{width}}{v / GIB:>9.2f}" for k, v in at_peak.items()]
    lines += [line, f"{'predicted peak (the sum)':<{width}}{plan.peak_bytes / GIB:>9.2f}",
              f"{'budget (' + plan.card + ')':<{width}}{plan.budget_bytes / GIB:>9.2f}",
              f"{f'planned to (keeping {1 - SAFETY:.0%} in reserve)':<{width}}{SAFETY * plan.budget_bytes / GIB:>9.2f}",
              f"{'headroom':<{width}}{(plan.budget_bytes - plan.peak_bytes) / GIB:>9.2f}"]
    apart = [k for k in plan.breakdown if k not in at_peak and not k.on_host]
    if apart:
        lines.append("\nnot alive at the peak (other moments of the step; its largest moment is counted above):")
        lines += [f"{label(k, s):<{width}}{plan.breakdown[k] / GIB:>9.2f}" for k in apart]
    if plan.gpus > 1:
        lines.append(f"\nper GPU, {plan.gpus} GPUs: " + (f"FSDP, weights sharded {s.shards} ways" if s.shards > 1
                                                          else "DDP, each GPU a full replica"))
    lines.append(f"\nsettings: {settings_text(plan)}")
    lines.append(f"predicted step time: {plan.step_seconds:.3f} s ({plan.grad_accum} x {s.micro_batch} rows)")
    if plan.host_bytes:
        lines += [f"{label(k, s):<{width}}{v / GIB:>9.2f}" for k, v in plan.breakdown.items() if k.on_host]
        lines.append(f"host memory for offload: {plan.host_bytes / GIB:.2f} GiB pinned "
                     f"(available: {plan.host_available_bytes / GIB:.1f} GiB)")
    for key, (asked, chosen) in plan.changes.items():
        lines.append(f"planner chose {key}={chosen} (config: {asked})")
    lines.append("fits" if plan.fits else f"does NOT fit: {refusal(plan)}")
    return "\n".join(lines)


def refusal(plan: Plan) -> str:
    """Why a plan does not fit, in numbers, and what does (plan.suggestion)."""
    return (f"predicted peak {plan.peak_bytes / GIB:.2f} GiB at the smallest of the settings snugtune has "
            f"({settings_text(plan)}), against the {plan.budget_bytes / GIB:.2f} GiB budget ({plan.card}) "
            f"planned to {SAFETY * plan.budget_bytes / GIB:.2f} GiB keeping {1 - SAFETY:.0%} in reserve. "
            f"Try: {plan.suggestion}")


def _fits(cfg: Config, inv: Inventory, budget: int, facts: RunFacts, host: int,
          most_micro: int | None = None) -> Plan | None:
    return search(cfg, inv, budget, "", facts, host, SAFETY * budget, most_micro)[0]


def longest_seq(cfg: Config, inv: Inventory, budget: int, host: int, facts: RunFacts) -> int | None:
    """The longest max_seq_len (a multiple of SEQ_STEP, below the config's) that fits by the planner's own
    search, found by bisection (the peak grows with the sequence at every setting); None if none does."""
    low, high = 0, (cfg.max_seq_len - 1) // SEQ_STEP  # low fits (or is 0), high + 1 does not
    unknown_rows = replace(facts, trained=None)  # the data's rows are not those of another length
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(cfg.model_copy(update={"max_seq_len": mid * SEQ_STEP}), inv, budget, unknown_rows, host):
            low = mid
        else:
            high = mid - 1
    return low * SEQ_STEP or None


def smallest_budget(cfg: Config, inv: Inventory, budget: int, facts: RunFacts, host: int) -> int | None:
    """The smallest budget (to BUDGET_STEP) the config fits by the planner's own search, up to the largest card."""
    most = int(max(c["usable_gib"] for c in CARDS.values()) * GIB) // BUDGET_STEP
    low = budget // BUDGET_STEP  # does not fit
    if not _fits(cfg, inv, most * BUDGET_STEP, facts, host):
        return None
    high = most
    while high - low > 1:
        mid = (low + high) // 2
        if _fits(cfg, inv, mid * BUDGET_STEP, facts, host):
            high = mid
        else:
            low = mid
    return high * BUDGET_STEP


def refusal_suggestion(cfg: Config, inv: Inventory, plan: Plan, facts: RunFacts,
                       suggest_cards: bool = True) -> str:
    """Each idea one that changes something and that fits by the planner's own search."""
    budget, host = plan.budget_bytes, plan.host_available_bytes
    ideas = []
    if plan.peak_bytes <= SAFETY * budget:  # the GPU would do; the host lacks the memory the offload needs
        ideas.append(f"free host memory: this plan needs {plan.host_bytes / GIB:.1f} GiB of it for offload, and "
                     f"plans keep to {HOST_SAFETY:.0%} of what is available ({host / GIB:.1f} GiB)")
    seq = longest_seq(cfg, inv, budget, host, facts)
    if seq:
        fitting = _fits(cfg.model_copy(update={"max_seq_len": seq}), inv, budget, replace(facts, trained=None), host)
        ideas.append(f"max_seq_len={seq}, the longest that fits (then micro_batch={fitting.decisions.micro_batch}, "
                     f"predicted peak {fitting.peak_bytes / GIB:.2f} GiB)")
    method = METHODS[cfg.method]
    if method.base_bits != 4 and method.trains_base != "all":
        qlora = cfg.model_copy(update={"method": "qlora", "quant": cfg.quant.model_copy(update={"bits": None})})
        if _fits(qlora, inv, budget, facts, host):
            ideas.append("method=qlora (4-bit base weights)")
    need = smallest_budget(cfg, inv, budget, facts, host) if suggest_cards else None
    if need:
        cards = sorted((c["usable_gib"], name) for name, c in CARDS.items() if c["usable_gib"] * GIB >= need)
        ideas.append(f"a card with at least {need / GIB:.2f} GiB usable, such as {cards[0][1]}")
    return "; or ".join(ideas) if ideas else "no setting snugtune knows fits, CPU offload included"
