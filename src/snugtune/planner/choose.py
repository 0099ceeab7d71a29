"""Choosing a run's settings: the fastest that fits a budget with a safety margin, searched over the
micro-batch split of the rows per step, checkpointing (none, the first k blocks, all, all with MLP
tiling), CUDA graphs or eager steps, a dense copy of 4-bit weights, and CPU offload (input embeddings,
activations, then frozen block weights), each where the config leaves it to 'auto'. Works offline from a
model's config alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import product
from typing import NamedTuple

from snugtune.config import Config
from snugtune.memory_rules import (ATTENTION_HEAD_GROUPS, MLP_TILE_TOKENS, compiles_blocks, holds_dense_copy,
                                   keeps_dense_weights, leans_norms, replays_cuda_graphs, tiles_attention)
from snugtune.methods import METHODS
from snugtune.planner.cards import budget_bytes, packed_rows_masked
from snugtune.planner.inventory import Inventory, inventory_for
from snugtune.planner.memory import Breakdown, Settings, alive_at_peak, estimate, host_bytes, peak
from snugtune.planner.step_time import seconds_per_step

SAFETY = 0.92               # plan to at most this share of the budget
HOST_SAFETY = 0.9           # plan to at most this share of the host's available memory


class Offload(NamedTuple):
    """Config `offload.<name>` choices; fields in the order of OFFLOAD_NAMES, cheapest first."""
    embeddings: bool = False
    activations: bool = False
    weights: bool = False


NO_OFFLOAD = Offload()
OFFLOAD_NAMES = Offload._fields


@dataclass
class Plan:
    settings: Settings
    breakdown: Breakdown
    peak_bytes: int
    budget_bytes: int
    card: str
    fits: bool
    grad_accum: int
    changes: dict[str, list] = field(default_factory=dict)   # field -> [asked, chosen]
    suggestion: str | None = None
    host_bytes: int = 0            # pinned host memory the offload holds
    host_available_bytes: int = 0
    gpus: int = 1
    step_seconds: float = 0.0      # predicted time of one optimizer step (step_time.seconds_per_step)

    @property
    def offload(self) -> Offload:
        s = self.settings
        return Offload(s.embeddings_on_host, s.offload_activations, s.stream_weights)

    def to_json(self) -> dict:
        at_peak = alive_at_peak(self.breakdown)
        return {"peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "card": self.card, "safety": SAFETY,
                "breakdown": {k.name.lower(): v for k, v in self.breakdown.items()},
                "not_alive_at_peak": [k.name.lower() for k in self.breakdown if k not in at_peak],
                "host_bytes": self.host_bytes, "host_available_bytes": self.host_available_bytes,
                "predicted_step_seconds": self.step_seconds,
                "settings": {**asdict(self.settings), "grad_accum": self.grad_accum,
                             "offload": offload_text(self.offload), "lora_targets": list(self.settings.lora_targets)},
                "changes": self.changes, "suggestion": self.suggestion}


def offload_text(offload: Offload) -> str:
    return "+".join(name for name, on in offload._asdict().items() if on) or "none"


def host_memory_available() -> int:
    """Bytes of host memory available now (psutil)."""
    import psutil
    return int(psutil.virtual_memory().available)


def settings_for(cfg: Config, inv: Inventory, micro_batch: int, checkpointing: bool, seq: int | None = None,
                 method: str | None = None, checkpointed_layers: int | None = None,
                 trained: list[int] | None = None, offload: Offload = NO_OFFLOAD, shards: int = 1, gpus: int = 1,
                 masked: bool = True, tiled_mlp: bool = False, graphs: bool = True,
                 dense_copy: bool = False) -> Settings:
    """The estimate's inputs for one candidate; compilation, kept dense weights and CUDA graphs follow the
    engine's rules (memory_rules) for it. graphs=False: eager steps even where graphs would run.
    dense_copy: a dense copy of the 4-bit block weights asked for (held where memory_rules.holds_dense_copy
    allows it, as the engine does)."""
    from snugtune.registry import block_linear_names
    method = method or cfg.method
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(inv.model_type)
    one_process = gpus == 1
    compiling = compiles_blocks(cfg.train.compile, True, one_process, offload.weights)
    copied = holds_dense_copy(dense_copy, METHODS[method].base_bits == 4, shards > 1, offload.weights)
    replays = METHODS[method].replays_graphs
    draws = inv.draws_random_numbers  # LoRA dropout draws none: its masks come from a seeded hash
    return Settings(method=method, lora_r=cfg.lora.r, lora_targets=tuple(targets),
                    lora_last_layers=cfg.lora.last_layers, double_quant=cfg.quant.double_quant,
                    optimizer=cfg.train.optimizer if shards == 1 else "adamw",  # FSDP trains with torch AdamW
                    compute_bytes=2, micro_batch=micro_batch,
                    max_seq_len=seq or cfg.max_seq_len, grad_checkpointing=checkpointing,
                    trainable_layers=cfg.freeze.trainable_layers, checkpointed_layers=checkpointed_layers,
                    lora_dropout=cfg.lora.dropout, trained_tokens=sum(trained[:micro_batch]) if trained else None,
                    offload_activations=offload.activations, stream_weights=offload.weights,
                    embeddings_on_host=offload.embeddings, shards=shards, attention_mask=masked, tiled_mlp=tiled_mlp,
                    dense_weights_kept=keeps_dense_weights(compiling, checkpointing, any(offload), copied),
                    dense_copy=copied, lean_norms=leans_norms(tiled_mlp, compiling, inv.model_type),
                    head_groups=ATTENTION_HEAD_GROUPS if tiles_attention(tiled_mlp, compiling) else 1,
                    cuda_graphs=graphs and replays_cuda_graphs(
                        cfg.train.cuda_graphs, compiling, True, one_process, offload.weights, replays,
                        offload.activations, tiled_mlp, draws))


def levels(cfg: Config, gpus: int, inv: Inventory) -> list[tuple[int, Offload]]:
    """(FSDP shards, offload) combinations the config allows, cheapest first: replicated (DDP), sharded
    over the GPUs (FSDP, LoRA methods), then CPU offload on each GPU."""
    parallel = [1, gpus] if gpus > 1 else [1]
    if gpus > 1 and cfg.train.data_parallel != "auto":
        parallel = [gpus if cfg.train.data_parallel == "fsdp" else 1]
    if not METHODS[cfg.method].shards_with_fsdp:
        parallel = [p for p in parallel if p == 1] or [1]
    offloads = offload_levels(cfg, inv)
    none = Offload(embeddings=cfg.offload.embeddings is True)
    # FSDP shards the root unit (embeddings included) over the GPUs: no host table there
    found = [(shards, none if shards == 1 else NO_OFFLOAD) for shards in parallel if none in offloads]
    if parallel[0] == 1:
        found += [(1, offload) for offload in offloads if offload != none]
    return found


def offload_levels(cfg: Config, inv: Inventory) -> list[Offload]:
    """Offload combinations the config allows, cheapest first. The input embeddings stay in host memory
    only when frozen and not tied to the output head, and not with weight streaming (which places every
    non-block weight on the GPU)."""
    order = (Offload(), Offload(embeddings=True), Offload(activations=True),
             Offload(embeddings=True, activations=True), Offload(weights=True), Offload(activations=True, weights=True))
    method = METHODS[cfg.method]
    allowed = []
    for offload in order:
        if any(getattr(cfg.offload, name) not in ("auto", on) for name, on in offload._asdict().items()):
            continue
        if offload.weights and (not method.streams_weights or cfg.train.grad_checkpointing is False):
            continue
        if offload.embeddings and (method.trains_base == "all" or inv.tied_embeddings):
            continue
        allowed.append(offload)
    return allowed


def checkpointing_options(cfg: Config, inv: Inventory, mb: int, limit: float, make,
                          compiling: bool = False) -> list[Settings]:
    """Checkpointing options for one micro-batch: as asked, or under 'auto' none, else the fewest
    recomputed blocks (from the first) that fit `limit` bytes, else all of them. Weight streaming
    recomputes every block. `make(checkpointing, **more)` builds the Settings.

    compiling: blocks are compiled (memory_rules.compiles_blocks); then 'auto' weighs none or all only.
    Partial checkpointing of compiled blocks ran slower than recomputing all of them on an H200
    (Llama-3.1-8B shape, 1 x 2048 under 15 GiB: 26 of 32 blocks 6,889 tok/s, every block 8,685-9,919;
    docs/benchmarks.md), so the planner does not choose it there until a run shows otherwise."""
    tiled = cfg.train.tiled_mlp
    if tiled == "auto":  # last of the recomputation options: every block, and each MLP in tiles
        tiled = (bool(cfg.train.grad_checkpointing) and mb * cfg.max_seq_len > MLP_TILE_TOKENS
                 and peak(estimate(inv, make(True))) > limit)
    if make(True).stream_weights:
        return [make(True, tiled_mlp=tiled)]
    if cfg.train.grad_checkpointing != "auto":
        return [make(bool(cfg.train.grad_checkpointing), checkpointed_layers=cfg.train.checkpoint_layers,
                     tiled_mlp=tiled)]
    if tiled:
        return [make(True, tiled_mlp=True)]
    if compiling:
        return [make(False), make(True)]
    for blocks in range(1, inv.layers):  # peak falls and step time rises with each recomputed block
        s = make(True, checkpointed_layers=blocks)
        if peak(estimate(inv, s)) <= limit:
            return [make(False), s]
    return [make(False), make(True)]


def dense_copy_options(cfg: Config, offload: Offload) -> tuple[bool, ...]:
    """quant.dense_copy asked of one level's candidates: as the config says, or under 'auto' without and with
    one where nothing is offloaded (offload means memory is short). settings_for holds it where possible."""
    if cfg.quant.dense_copy != "auto":
        return (cfg.quant.dense_copy,)
    return (False, True) if offload == NO_OFFLOAD else (False,)


def micro_batches(cfg: Config, most: int | None = None) -> list[int]:
    """Micro-batch sizes that split the rows per step evenly, largest first: up to the config's micro_batch,
    or any under micro_batch: auto; at most `most`."""
    rows = cfg.train.step_rows
    top = rows if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    top = min(top, most or top)
    return [d for d in range(top, 0, -1) if rows % d == 0]


@dataclass(frozen=True)
class Candidate:
    seconds: float
    settings: Settings
    parts: Breakdown


def candidates(cfg: Config, inv: Inventory, limit: float, shards: int, offload: Offload, micro: list[int],
               trained: list[int] | None, gpus: int, masked: bool, card: str) -> list[Candidate]:
    """Every setting the search weighs at one level: each micro-batch, checkpointing option, graphs or not,
    dense copy or not."""
    found: dict[Settings, Candidate] = {}
    graph_options = (True, False) if cfg.train.cuda_graphs == "auto" else (True,)  # else as asked
    compiling = compiles_blocks(cfg.train.compile, True, gpus == 1, offload.weights)
    for graphs, mb, dense in product(graph_options, micro, dense_copy_options(cfg, offload)):
        make = partial(settings_for, cfg, inv, mb, trained=trained, offload=offload, shards=shards, gpus=gpus,
                       masked=masked, graphs=graphs, dense_copy=dense)
        for s in checkpointing_options(cfg, inv, mb, limit, make, compiling):
            if s not in found:
                parts = estimate(inv, s)
                found[s] = Candidate(seconds_per_step(inv, s, cfg.train.step_rows // mb, parts, card), s, parts)
    return list(found.values())


def search(cfg: Config, inv: Inventory, budget: int, card: str, trained: list[int] | None, host_available: int,
           gpus: int, masked: bool, limit: float, most_micro: int | None = None) -> tuple[Plan | None, list]:
    """The fastest candidate within `limit` bytes (and the host's memory) at the cheapest level that has one;
    also every candidate weighed, for the refusal when none fits."""
    weighed = []
    micro = micro_batches(cfg, most_micro)
    for shards, offload in levels(cfg, gpus, inv):
        level = candidates(cfg, inv, limit, shards, offload, micro, trained, gpus, masked, card)
        weighed += level
        fitting = [c for c in level if peak(c.parts) <= limit and host_bytes(c.parts) <= HOST_SAFETY * host_available]
        if fitting:
            best = min(fitting, key=lambda c: c.seconds)
            return _plan(cfg, inv, best, budget, card, True, host_available, gpus), weighed
    return None, weighed


def _plan(cfg: Config, inv: Inventory, c: Candidate, budget: int, card: str, fits: bool, host_available: int,
          gpus: int) -> Plan:
    accum = cfg.train.step_rows // c.settings.micro_batch
    eager = not c.settings.cuda_graphs and graphs_possible(cfg, inv, c.settings, gpus)
    return Plan(c.settings, c.parts, peak(c.parts), budget, card, fits, accum,
                changes(cfg, c.settings, accum, gpus, eager) if fits else {}, host_bytes=host_bytes(c.parts),
                host_available_bytes=host_available, gpus=gpus, step_seconds=c.seconds)


def plan_for_budget(cfg: Config, budget: int, card: str = "", inv: Inventory | None = None,
                    trained_per_row: list[int] | None = None, host_available: int | None = None,
                    gpus: int = 1, masked: bool = True, most_micro: int | None = None,
                    suggest_cards: bool = True) -> Plan:
    """The fastest settings that fit `budget` bytes of GPU memory (see the module's docstring). Offload is
    used only when nothing fits without it, and only within the host's available memory. fits=False
    with a suggestion (explain.suggest) when nothing fits.

    trained_per_row: trained positions of each training row, when the data is known: the loss then holds
    the logits of the micro-batch with the most of them rather than of every position.
    gpus: processes under torchrun, each with `budget`; FSDP sharding is considered when replicas do not fit.
    masked: whether batches carry an attention mask (False when the data is known to be one sample a row,
    as long documents are: attention is then plain causal and holds no seq x seq mask).
    most_micro: the largest micro-batch to consider (after an out-of-memory error: no larger than what failed).
    suggest_cards: whether a refusal may name a bigger card (not after a step down: the budget is then a
    limit below the card the run has)."""
    from snugtune.planner.explain import refusal_suggestion
    inv = inv or inventory_for(cfg)
    host_available = host_memory_available() if host_available is None else host_available
    trained = sorted(trained_per_row, reverse=True) if trained_per_row else None
    plan, weighed = search(cfg, inv, budget, card, trained, host_available, gpus, masked, SAFETY * budget,
                           most_micro)
    if plan is not None:
        return plan
    smallest = min(weighed, key=lambda c: peak(c.parts))
    plan = _plan(cfg, inv, smallest, budget, card, False, host_available, gpus)
    plan.suggestion = refusal_suggestion(cfg, inv, plan, trained, gpus, masked, suggest_cards)
    return plan


def changes(cfg: Config, s: Settings, accum: int, gpus: int = 1, eager_chosen: bool = False) -> dict[str, list]:
    """Config fields whose value the plan chose: field -> [asked, chosen]."""
    found = {}
    if gpus > 1 and cfg.train.data_parallel == "auto":
        found["train.data_parallel"] = ["auto", "fsdp" if s.shards > 1 else "ddp"]
    if s.micro_batch != cfg.train.micro_batch:
        found["train.micro_batch"] = [cfg.train.micro_batch, s.micro_batch]
        found["train.grad_accum"] = [cfg.train.grad_accum, accum]
    if cfg.train.grad_checkpointing == "auto":
        found["train.grad_checkpointing"] = ["auto", s.grad_checkpointing]
        if s.checkpointed_layers is not None:
            found["train.checkpoint_layers"] = [cfg.train.checkpoint_layers, s.checkpointed_layers]
    for name, on in zip(OFFLOAD_NAMES, (s.embeddings_on_host, s.offload_activations, s.stream_weights)):
        if on and getattr(cfg.offload, name) == "auto":
            found[f"offload.{name}"] = ["auto", on]
    if s.tiled_mlp and cfg.train.tiled_mlp == "auto":
        found["train.tiled_mlp"] = ["auto", True]
    if eager_chosen and cfg.train.cuda_graphs == "auto":
        found["train.cuda_graphs"] = ["auto", False]
    if cfg.quant.dense_copy == "auto" and METHODS[cfg.method].base_bits == 4:
        found["quant.dense_copy"] = ["auto", s.dense_copy]
    return found


def graphs_possible(cfg: Config, inv: Inventory, s: Settings, gpus: int = 1) -> bool:
    """Whether the engine would replay this candidate's steps as CUDA graphs if the planner let it."""
    return settings_for(cfg, inv, s.micro_batch, s.grad_checkpointing, checkpointed_layers=s.checkpointed_layers,
                        offload=Offload(s.embeddings_on_host, s.offload_activations, s.stream_weights),
                        shards=s.shards, gpus=gpus, tiled_mlp=s.tiled_mlp, dense_copy=s.dense_copy).cuda_graphs


def plan_config(cfg: Config, gpu: str | None = None, trained_per_row: list[int] | None = None,
                gpus: int = 1, masked: bool | None = None) -> Plan:
    """Plan for --gpu, else for the config's budget; 'auto' means the GPU present (or an H100 profile).
    gpus: processes (one GPU each) under torchrun. masked: see plan_for_budget; None (the data not read):
    packed rows on a card without varlen flash attention (padded batches never carry a mask)."""
    name = gpu or cfg.budget
    if name == "auto":
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            if masked is None:
                from snugtune.attention import varlen_usable
                masked = cfg.data.packing and not varlen_usable(torch.device("cuda"))
            return plan_for_budget(cfg, total, torch.cuda.get_device_name(), trained_per_row=trained_per_row,
                                   gpus=gpus, masked=masked)
        name = "h100"
    size, _, card = budget_bytes(name)
    if masked is None:
        masked = cfg.data.packing and packed_rows_masked(card)
    return plan_for_budget(cfg, size, card, trained_per_row=trained_per_row, gpus=gpus, masked=masked)
