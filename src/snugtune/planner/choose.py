"""Choosing a run's settings: the fastest that fits a budget with a safety margin, searched over the
micro-batch split of the rows per step, checkpointing (none, the first k blocks, all, all with MLP
tiling), CUDA graphs or eager steps, a dense copy of 4-bit weights, and CPU offload (input embeddings,
activations, then frozen block weights), each where the config leaves it to 'auto'. Works offline from a
model's config alone."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from itertools import product

from snugtune.config import Config
from snugtune.memory_rules import (ATTENTION_HEAD_GROUPS, MLP_TILE_TOKENS, compiles_blocks, holds_dense_copy,
                                   fuses_lora, keeps_dense_weights, leans_norms, optimizer_for, reference_for,
                                   replays_cuda_graphs, rows_masked, tiles_attention)
from snugtune.methods import METHODS
from snugtune.planner.cards import budget_bytes, has_varlen_attention
from snugtune.planner.inventory import Inventory, inventory_for
from snugtune.planner.memory import Breakdown, estimate, host_bytes, peak
from snugtune.planner.plan import NO_OFFLOAD, OFFLOAD_NAMES, SAFETY, Decisions, Offload, Plan, resolved_config
from snugtune.planner.step_time import seconds_per_step

HOST_SAFETY = 0.9           # plan to at most this share of the host's available memory


def host_memory_available() -> int:
    """Bytes of host memory available now (psutil)."""
    import psutil
    return int(psutil.virtual_memory().available)


def decisions_for(cfg: Config, inv: Inventory, micro_batch: int, checkpointing: bool, seq: int | None = None,
                  method: str | None = None, checkpointed_layers: int | None = None,
                  trained: list[int] | None = None, offload: Offload = NO_OFFLOAD, shards: int = 1, gpus: int = 1,
                  masked: bool = True, tiled_mlp: bool = False, graphs: bool = True,
                  dense_copy: bool = False, cuda: bool = True, reference_copy: bool = False,
                  lengths_vary: bool = True) -> Decisions:
    """Every decision of one candidate: compilation, kept dense weights, lean norms, head groups, CUDA
    graphs and a preference objective's reference follow from its settings by memory_rules. graphs=False:
    eager steps even where graphs could run. dense_copy: a dense copy of the 4-bit block weights asked for
    (held where memory_rules.holds_dense_copy allows it). cuda: the run has a CUDA GPU (else nothing compiles
    unless asked, and no step replays). reference_copy: a frozen copy of the base as the reference (where
    memory_rules.reference_for takes one: full and freeze under dpo or kto). lengths_vary: the data's sequences
    pad to several lengths (a preference step's graphs then meet shapes they did not capture)."""
    from snugtune.registry import block_linear_names
    method = method or cfg.method
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(inv.model_type)
    one_process = gpus == 1
    compiling = compiles_blocks(cfg.train.compile, cuda, offload.weights)
    copied = holds_dense_copy(dense_copy, METHODS[method].base_bits == 4, shards > 1, offload.weights)
    replays = METHODS[method].replays_graphs
    draws = inv.draws_random_numbers  # LoRA dropout draws none: its masks come from a seeded hash
    return Decisions(method=method, lora_r=cfg.lora.r, lora_targets=tuple(targets),
                     lora_last_layers=cfg.lora.last_layers, double_quant=cfg.quant.double_quant,
                     optimizer=optimizer_for(cfg.train.optimizer, shards > 1),
                     compute_bytes=2, micro_batch=micro_batch, grad_accum=cfg.train.step_rows // micro_batch,
                     max_seq_len=seq or cfg.max_seq_len, grad_checkpointing=checkpointing,
                     trainable_layers=cfg.freeze.trainable_layers, checkpointed_layers=checkpointed_layers,
                     lora_dropout=cfg.lora.dropout, trained_tokens=sum(trained[:micro_batch]) if trained else None,
                     offload_activations=offload.activations, stream_weights=offload.weights,
                     embeddings_on_host=offload.embeddings, shards=shards, attention_mask=masked, tiled_mlp=tiled_mlp,
                     dense_weights_kept=keeps_dense_weights(compiling, checkpointing, any(offload), copied),
                     dense_copy=copied, lean_norms=leans_norms(tiled_mlp, compiling, inv.model_type),
                     head_groups=ATTENTION_HEAD_GROUPS if tiles_attention(tiled_mlp, compiling) else 1,
                     cuda_graphs=graphs and replays_cuda_graphs(
                         cfg.train.cuda_graphs, compiling, cuda, one_process, offload.weights, replays,
                         offload.activations, tiled_mlp, draws, cfg.objective),
                     lengths_vary=lengths_vary, tail_share=tail_share(trained, micro_batch, gpus),
                     compiled_blocks=compiling,
                     fused_lora=fuses_lora(METHODS[method].adapters, METHODS[method].base_bits),
                     objective=cfg.objective,
                     reference=reference_for(cfg.objective, METHODS[method].adapters, reference_copy))


def tail_share(trained: list[int] | None, micro_batch: int, gpus: int) -> float:
    """The share of a full micro-batch's rows that an epoch's last micro-batch in each process holds (0: full,
    or the data not read)."""
    if not trained:
        return 0.0
    return (-(-len(trained) // gpus) % micro_batch) / micro_batch


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
    only when frozen and not tied to the output head."""
    order = (Offload(), Offload(embeddings=True), Offload(activations=True),
             Offload(embeddings=True, activations=True), Offload(weights=True), Offload(embeddings=True, weights=True),
             Offload(activations=True, weights=True), Offload(embeddings=True, activations=True, weights=True))
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


def checkpointing_options(cfg: Config, inv: Inventory, mb: int, limit: float, host_limit: float,
                          make) -> list[Decisions]:
    """Checkpointing options for one micro-batch: as asked, or under 'auto' none, else the fewest
    recomputed blocks (from the first) that fit `limit` bytes of GPU memory and `host_limit` of host memory,
    else all of them. Weight streaming recomputes every block. With activations offloaded every count from
    that fewest to all is weighed: each block recomputed copies less to the host and back, so the fastest
    may recompute more. `make(checkpointing, **more)` builds the Decisions.

    Compiled blocks are recomputed partially too: on an H100 under a 15 GiB cap (Llama-3.1-8B shape,
    2026-12-07, docs/benchmarks.md) 20 of 32 blocks at 1 x 2048 ran 10,520-10,621 tok/s against 9,683 with
    all 32, 28 of 32 at 1 x 4096 10,758 against 9,497, and a DPO pair of 2 x 1,024 with 10-16 of 32 blocks
    8,192-8,335 against 7,347 (graphs replayed in each). An earlier run (2026-12-01, H200: 26 of 32 slower
    than 32) predates the engine's in-place LoRA add and graph pool changes."""
    tiled = cfg.train.tiled_mlp
    if tiled == "auto":  # last of the recomputation options: every block, and each MLP in tiles
        tiled = (bool(cfg.train.grad_checkpointing) and make(True).tokens > MLP_TILE_TOKENS
                 and peak(estimate(inv, make(True))) > limit)
    if make(True).stream_weights:
        return [make(True, tiled_mlp=tiled)]
    if cfg.train.grad_checkpointing != "auto":
        return [make(bool(cfg.train.grad_checkpointing), checkpointed_layers=cfg.train.checkpoint_layers,
                     tiled_mlp=tiled)]
    if tiled:
        return [make(True, tiled_mlp=True)]
    for blocks in range(1, inv.layers):  # peak falls and step time rises with each recomputed block
        s = make(True, checkpointed_layers=blocks)
        parts = estimate(inv, s)
        if peak(parts) <= limit and host_bytes(parts) <= host_limit:
            if not s.offload_activations:
                return [make(False), s]
            more = [make(True, checkpointed_layers=k) for k in range(blocks + 1, inv.layers)]
            return [make(False), s, *more, make(True)]
    return [make(False), make(True)]


def dense_copy_options(cfg: Config, offload: Offload) -> tuple[bool, ...]:
    """quant.dense_copy asked of one level's candidates: as the config says, or under 'auto' without and with
    one where nothing is offloaded (offload means memory is short). decisions_for holds it where possible."""
    if cfg.quant.dense_copy != "auto":
        return (cfg.quant.dense_copy,)
    return (False, True) if offload == NO_OFFLOAD else (False,)


def reference_copy_options(cfg: Config, offload: Offload) -> tuple[bool, ...]:
    """Whether a candidate holds a frozen copy of the base as its preference reference: weighed where
    memory_rules.reference_for takes one, and only where nothing is offloaded (offload means memory is
    short); the other candidates compute the reference log-probabilities before training."""
    takes_copy = reference_for(cfg.objective, METHODS[cfg.method].adapters, True) == "copy"
    return (True, False) if takes_copy and offload == NO_OFFLOAD else (False,)


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
    decisions: Decisions
    parts: Breakdown


@dataclass(frozen=True)
class RunFacts:
    """What the search holds fixed: the data's facts and the machine the run has."""
    trained: list[int] | None = None   # trained positions of each row, most first (None: the data not read)
    gpus: int = 1                       # processes under torchrun, one GPU each
    masked: bool = True                 # batches carry a dense attention mask (memory_rules.rows_masked)
    cuda: bool = True                   # the run has a CUDA GPU (False: planned for a card, trained on the CPU)
    lengths_vary: bool = True           # the data's sequences pad to several lengths (True: not known)


def candidates(cfg: Config, inv: Inventory, limit: float, host_limit: float, shards: int, offload: Offload,
               micro: list[int], facts: RunFacts, card: str) -> list[Candidate]:
    """Every setting the search weighs at one level: each micro-batch, checkpointing option, graphs or not,
    dense copy or not."""
    found: dict[Decisions, Candidate] = {}
    graph_options = (True, False) if cfg.train.cuda_graphs == "auto" else (True,)  # else as asked
    for graphs, mb, dense, copy in product(graph_options, micro, dense_copy_options(cfg, offload),
                                           reference_copy_options(cfg, offload)):
        make = partial(decisions_for, cfg, inv, mb, trained=facts.trained, offload=offload, shards=shards,
                       gpus=facts.gpus, masked=facts.masked, graphs=graphs, dense_copy=dense, cuda=facts.cuda,
                       reference_copy=copy, lengths_vary=facts.lengths_vary)
        for d in checkpointing_options(cfg, inv, mb, limit, host_limit, make):
            if d not in found:
                parts = estimate(inv, d)
                found[d] = Candidate(seconds_per_step(inv, d, cfg.train.step_rows // mb, parts, card), d, parts)
    return list(found.values())


def search(cfg: Config, inv: Inventory, budget: int, card: str, facts: RunFacts, host_available: int, limit: float,
           most_micro: int | None = None) -> tuple[Plan | None, list]:
    """The fastest candidate within `limit` bytes (and the host's memory) at the cheapest level that has one;
    also every candidate weighed, for the refusal when none fits."""
    weighed = []
    micro = micro_batches(cfg, most_micro)
    host_limit = HOST_SAFETY * host_available
    for shards, offload in levels(cfg, facts.gpus, inv):
        level = candidates(cfg, inv, limit, host_limit, shards, offload, micro, facts, card)
        weighed += level
        fitting = [c for c in level if peak(c.parts) <= limit and host_bytes(c.parts) <= host_limit]
        if fitting:  # as fast with a preference reference copy as without: the copy (memory_rules.reference_for)
            best = min(fitting, key=lambda c: (c.seconds, c.decisions.reference != "copy"))
            return _plan(cfg, inv, best, budget, card, True, host_available, facts), weighed
    return None, weighed


def _plan(cfg: Config, inv: Inventory, c: Candidate, budget: int, card: str, fits: bool, host_available: int,
          facts: RunFacts) -> Plan:
    eager = not c.decisions.cuda_graphs and graphs_possible(cfg, inv, c.decisions, facts)
    return Plan(resolved_config(cfg, c.decisions), c.decisions, c.parts, peak(c.parts), budget, card, fits,
                changes(cfg, c.decisions, facts.gpus, eager) if fits else {}, host_bytes=host_bytes(c.parts),
                host_available_bytes=host_available, gpus=facts.gpus, step_seconds=c.seconds, cuda=facts.cuda)


def plan_for_budget(cfg: Config, budget: int, card: str = "", inv: Inventory | None = None,
                    trained_per_row: list[int] | None = None, host_available: int | None = None,
                    gpus: int = 1, masked: bool = True, most_micro: int | None = None,
                    suggest_cards: bool = True, cuda: bool = True, lengths_vary: bool = True) -> Plan:
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
    limit below the card the run has).
    cuda: the run has a CUDA GPU; False plans the card's memory for a run on the CPU (no compilation unless
    asked, no CUDA graphs). lengths_vary: whether the data's sequences pad to several lengths (so batches
    of several shapes), unless known not to."""
    from snugtune.planner.explain import refusal_suggestion
    inv = inv or inventory_for(cfg)
    host_available = host_memory_available() if host_available is None else host_available
    trained = sorted(trained_per_row, reverse=True) if trained_per_row else None
    facts = RunFacts(trained, gpus, masked, cuda, lengths_vary)
    plan, weighed = search(cfg, inv, budget, card, facts, host_available, SAFETY * budget, most_micro)
    if plan is not None:
        return plan
    smallest = min(weighed, key=lambda c: peak(c.parts))
    plan = _plan(cfg, inv, smallest, budget, card, False, host_available, facts)
    return replace(plan, suggestion=refusal_suggestion(cfg, inv, plan, facts, suggest_cards))


def changes(cfg: Config, d: Decisions, gpus: int = 1, eager_chosen: bool = False) -> dict[str, list]:
    """Planned fields whose value is worth a line to the user: field -> [asked, chosen]. The others are what
    the config's value means on this machine (compilation on a GPU, no offload when it fits, ...)."""
    found = {}
    if gpus > 1 and cfg.train.data_parallel == "auto":
        found["train.data_parallel"] = ["auto", d.data_parallel]
    if d.optimizer != cfg.train.optimizer:
        found["train.optimizer"] = [cfg.train.optimizer, d.optimizer]
    if d.micro_batch != cfg.train.micro_batch:
        found["train.micro_batch"] = [cfg.train.micro_batch, d.micro_batch]
        found["train.grad_accum"] = [cfg.train.grad_accum, d.grad_accum]
    if cfg.train.grad_checkpointing == "auto":
        found["train.grad_checkpointing"] = ["auto", d.grad_checkpointing]
        if d.checkpointed_layers is not None:
            found["train.checkpoint_layers"] = [cfg.train.checkpoint_layers, d.checkpointed_layers]
    for name, on in zip(OFFLOAD_NAMES, (d.embeddings_on_host, d.offload_activations, d.stream_weights)):
        if on and getattr(cfg.offload, name) == "auto":
            found[f"offload.{name}"] = ["auto", on]
    if d.tiled_mlp and cfg.train.tiled_mlp == "auto":
        found["train.tiled_mlp"] = ["auto", True]
    if eager_chosen and cfg.train.cuda_graphs == "auto":
        found["train.cuda_graphs"] = ["auto", False]
    if cfg.quant.dense_copy == "auto" and METHODS[cfg.method].base_bits == 4:
        found["quant.dense_copy"] = ["auto", d.dense_copy]
    return found


def graphs_possible(cfg: Config, inv: Inventory, d: Decisions, facts: RunFacts) -> bool:
    """Whether this candidate's steps could replay as CUDA graphs if the planner let them."""
    return decisions_for(cfg, inv, d.micro_batch, d.grad_checkpointing, checkpointed_layers=d.checkpointed_layers,
                         offload=Offload(d.embeddings_on_host, d.offload_activations, d.stream_weights),
                         shards=d.shards, gpus=facts.gpus, tiled_mlp=d.tiled_mlp, dense_copy=d.dense_copy,
                         cuda=facts.cuda).cuda_graphs


def plan_config(cfg: Config, gpu: str | None = None, trained_per_row: list[int] | None = None,
                gpus: int = 1, masked: bool | None = None, inv: Inventory | None = None, cuda: bool = True,
                lengths_vary: bool = True) -> Plan:
    """Plan for --gpu, else for the config's budget; 'auto' means the GPU present (or an H100 profile).
    gpus: processes (one GPU each) under torchrun. masked: see plan_for_budget; None (the data not read):
    packed rows on a card without varlen flash attention (memory_rules.rows_masked). cuda: see plan_for_budget."""
    name = gpu or cfg.budget
    if name == "auto":
        import torch
        if torch.cuda.is_available():
            from snugtune.attention import varlen_usable
            _, total = torch.cuda.mem_get_info()
            varlen = varlen_usable(torch.device("cuda"), cfg.train.attention_kernels)
            masked = rows_masked(cfg.data.packing, varlen) if masked is None else masked
            return plan_for_budget(cfg, total, torch.cuda.get_device_name(), inv, trained_per_row, gpus=gpus,
                                   masked=masked, cuda=cuda, lengths_vary=lengths_vary)
        name = "h100"
    size, _, card = budget_bytes(name)
    varlen = has_varlen_attention(card) and cfg.train.attention_kernels == "auto"
    masked = rows_masked(cfg.data.packing, varlen) if masked is None else masked
    return plan_for_budget(cfg, size, card, inv, trained_per_row, gpus=gpus, masked=masked, cuda=cuda,
                           lengths_vary=lengths_vary)
