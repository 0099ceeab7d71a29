"""The memory planner: predict a run's peak GPU memory by component, and choose the fastest settings
that fit a budget with a safety margin (DESIGN §6). Works offline from a model's config alone."""

from __future__ import annotations


from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from snugtune.config import Config
from snugtune.errors import ConfigError
from snugtune.methods import METHODS
from snugtune.planner.cards import CARDS, GIB, budget_bytes
from snugtune.planner.memory import (EMBEDDING_TABLE, HOST, MLP_TILE_TOKENS, Inventory, Settings, estimate,
                                     host_bytes, inventory_from_config, peak, step_flops)

SAFETY = 0.92               # plan to at most this share of the budget
ASSUMED_FLOPS = 3.0e14      # sustained bf16 rate used only to rank candidate settings
STEP_OVERHEAD_S = 0.03      # fixed cost per micro-batch (launches, dequantization, optimizer)
HOST_COPY_BYTES_S = 12e9    # pinned host <-> GPU copies (PCIe 4 x16 in practice)
HOST_SAFETY = 0.9           # plan to at most this share of the host's available memory



@dataclass
class Plan:
    settings: Settings
    breakdown: dict[str, int]
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

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "card": self.card, "breakdown": self.breakdown, "host_bytes": self.host_bytes,
                "host_available_bytes": self.host_available_bytes,
                "settings": {**asdict(self.settings), "grad_accum": self.grad_accum,
                             "offload": _offload_text(self.settings), "lora_targets": list(self.settings.lora_targets)},
                "changes": self.changes, "suggestion": self.suggestion}


# config `offload.<name>` and the Settings field that carries the planner's choice, cheapest first
OFFLOAD_FIELDS = (("embeddings", "embeddings_on_host"), ("activations", "offload_activations"),
                  ("weights", "stream_weights"))


def offload_choices(s: Settings) -> dict[str, bool]:
    """The planner's offload choices as config `offload.*` values."""
    return {name: getattr(s, field) for name, field in OFFLOAD_FIELDS}


def _offload_text(s: Settings) -> str:
    return "+".join(name for name, on in offload_choices(s).items() if on) or "none"


def host_memory_available() -> int:
    """Bytes of host memory available now (psutil)."""
    import psutil
    return int(psutil.virtual_memory().available)


def model_config_for(cfg: Config):
    """The transformers config of cfg.model without loading weights (registry shapes offline)."""
    from transformers import AutoConfig
    from snugtune.registry import HUB_IDS, shape_config
    name = cfg.model
    shape = None
    if name.startswith("shape:"):
        shape = name.removeprefix("shape:")
    elif name in HUB_IDS:
        shape = HUB_IDS[name]
    elif name == "smollm2-135m-instruct":
        shape = "smollm2-135m"
    if shape is not None:
        try:
            raw = shape_config(shape)
        except KeyError:
            raise ConfigError(f"model: unknown shape '{shape}'") from None
        model_type = raw.pop("model_type")
        raw["vocab_size"] = max(raw["vocab_size"], 49152) if name.startswith("shape:") else raw["vocab_size"]
        return AutoConfig.for_model(model_type, **raw)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    raise ConfigError(f"model: cannot plan for '{name}' offline (not in the registry and not a local folder)")


def _settings(cfg: Config, inv: Inventory, micro_batch: int, checkpointing: bool, seq: int | None = None,
              method: str | None = None, checkpointed_layers: int | None = None,
              trained: list[int] | None = None, offload: tuple[bool, bool, bool] = (False, False, False),
              shards: int = 1, masked: bool = True, tiled_mlp: bool = False) -> Settings:
    from snugtune.models import block_linear_names
    targets = cfg.lora.targets if cfg.lora.targets != "all-linear" else block_linear_names(inv.model_type)
    return Settings(method=method or cfg.method, lora_r=cfg.lora.r, lora_targets=tuple(targets),
                    lora_last_layers=cfg.lora.last_layers, double_quant=cfg.quant.double_quant,
                    optimizer=cfg.train.optimizer if shards == 1 else "adamw",  # FSDP trains with torch AdamW
                    compute_bytes=2, micro_batch=micro_batch,
                    max_seq_len=seq or cfg.max_seq_len, grad_checkpointing=checkpointing,
                    trainable_layers=cfg.freeze.trainable_layers, checkpointed_layers=checkpointed_layers,
                    lora_dropout=cfg.lora.dropout, trained_tokens=sum(trained[:micro_batch]) if trained else None,
                    offload_activations=offload[0], stream_weights=offload[1], embeddings_on_host=offload[2],
                    shards=shards, attention_mask=masked, tiled_mlp=tiled_mlp,
                    dense_weights_kept=_dense_weights_kept(cfg, checkpointing, offload, shards, tiled_mlp))


def _dense_weights_kept(cfg: Config, checkpointing: bool, offload: tuple[bool, bool, bool], shards: int,
                        tiled_mlp: bool) -> bool:
    """engine.speedups.dense_weights_kept_in, for the planner: compiled (train.compile, auto: one process, no
    tiling) checkpointed blocks keep their dequantized weights for backward unless anything is offloaded."""
    compiled = cfg.train.compile is True or (cfg.train.compile == "auto" and shards == 1 and not tiled_mlp)
    return compiled and checkpointing and not any(offload)


def _seconds_per_step(inv: Inventory, s: Settings, accum: int, parts: dict[str, int]) -> float:
    # out and back (activations), forward and recompute (weights); of the embedding table only the batch's rows
    copied = host_bytes(parts) - parts.get(HOST + EMBEDDING_TABLE, 0)
    copies = 2 * copied / HOST_COPY_BYTES_S
    if s.embeddings_on_host:
        copies += s.micro_batch * s.max_seq_len * inv.hidden * s.compute_bytes / HOST_COPY_BYTES_S
    return accum * (step_flops(inv, s) / ASSUMED_FLOPS + STEP_OVERHEAD_S + copies)


def _levels(cfg: Config, gpus: int, inv: Inventory) -> list[tuple[int, tuple[bool, bool, bool]]]:
    """(FSDP shards, (activations, weights, embeddings) offload) combinations the config allows, cheapest
    first: replicated (DDP), sharded over the GPUs (FSDP, LoRA methods), then CPU offload on each GPU."""
    parallel = [1, gpus] if gpus > 1 else [1]
    if gpus > 1 and cfg.train.data_parallel != "auto":
        parallel = [gpus if cfg.train.data_parallel == "fsdp" else 1]
    if not METHODS[cfg.method].shards_with_fsdp:
        parallel = [p for p in parallel if p == 1] or [1]
    offloads = _offload_levels(cfg, inv)
    none = (False, False, cfg.offload.embeddings is True)
    # FSDP shards the root unit (embeddings included) over the GPUs: no host table there
    levels = [(shards, none if shards == 1 else (False, False, False)) for shards in parallel if none in offloads]
    if parallel[0] == 1:
        levels += [(1, offload) for offload in offloads if offload != none]
    return levels


def _offload_levels(cfg: Config, inv: Inventory) -> list[tuple[bool, bool, bool]]:
    """(activations, weights, embeddings) offload combinations the config allows, cheapest first. The input
    embeddings stay in host memory only when frozen and not tied to the output head, and not with weight
    streaming (which places every non-block weight on the GPU)."""
    allowed = []
    order = ((False, False, False), (False, False, True), (True, False, False), (True, False, True),
             (False, True, False), (True, True, False))
    for acts, weights, embeds in order:
        if cfg.offload.activations != "auto" and acts != cfg.offload.activations:
            continue
        if cfg.offload.weights != "auto" and weights != cfg.offload.weights:
            continue
        if cfg.offload.embeddings != "auto" and embeds != cfg.offload.embeddings:
            continue
        if weights and (not METHODS[cfg.method].streams_weights or cfg.train.grad_checkpointing is False):
            continue
        if embeds and (METHODS[cfg.method].trains_base == "all" or inv.tied_embeddings):
            continue
        allowed.append((acts, weights, embeds))
    return allowed


def _fastest_fitting(cfg: Config, inv: Inventory, mb: int, limit: float, trained: list[int] | None,
                     offload: tuple[bool, bool, bool], shards: int = 1, masked: bool = True) -> list[Settings]:
    """Checkpointing options for one micro-batch: as asked, or under 'auto' none, else the fewest
    recomputed blocks (from the first) that fit `limit` bytes, else all of them. Weight streaming
    recomputes every block."""
    make = partial(_settings, cfg, inv, mb, trained=trained, offload=offload, shards=shards, masked=masked)
    tiled = cfg.train.tiled_mlp
    if tiled == "auto":  # last of the recomputation options: every block, and each MLP in tiles
        tiled = (bool(cfg.train.grad_checkpointing) and mb * cfg.max_seq_len > MLP_TILE_TOKENS
                 and peak(estimate(inv, make(True))) > limit)
    if offload[1]:
        return [make(True, tiled_mlp=tiled)]
    if cfg.train.grad_checkpointing != "auto":
        return [make(bool(cfg.train.grad_checkpointing), checkpointed_layers=cfg.train.checkpoint_layers,
                     tiled_mlp=tiled)]
    if tiled:
        return [make(True, tiled_mlp=True)]
    for blocks in range(1, inv.layers):  # peak falls and step time rises with each recomputed block
        s = make(True, checkpointed_layers=blocks)
        if peak(estimate(inv, s)) <= limit:
            return [make(False), s]
    return [make(False), make(True)]


def plan_for_budget(cfg: Config, budget: int, card: str = "", inv: Inventory | None = None,
                    trained_per_row: list[int] | None = None, host_available: int | None = None,
                    gpus: int = 1, masked: bool = True) -> Plan:
    """The fastest settings that fit `budget` bytes of GPU memory: micro-batch (effective batch kept
    through accumulation), checkpointing (off, partial: the first k blocks, full, then full with MLP tiling)
    and CPU offload (input embeddings, activations, then frozen block weights) where the config leaves them
    to 'auto'. Offload is used only
    when nothing fits without it, and only within the host's available memory. fits=False with a
    suggestion when nothing fits.

    trained_per_row: trained positions of each training row, when the data is known: the loss then holds
    the logits of the micro-batch with the most of them rather than of every position.
    gpus: processes under torchrun, each with `budget`; FSDP sharding is considered when replicas do not fit.
    masked: whether batches carry an attention mask (False when the data is known to be one sample a row,
    as long documents are: attention is then plain causal and holds no seq x seq mask)."""
    inv = inv or inventory_from_config(model_config_for(cfg))
    host_available = host_memory_available() if host_available is None else host_available
    trained = sorted(trained_per_row, reverse=True) if trained_per_row else None
    effective = cfg.train.micro_batch * cfg.train.grad_accum
    micro = [d for d in range(cfg.train.micro_batch, 0, -1) if effective % d == 0]
    candidates = []
    for shards, offload in _levels(cfg, gpus, inv):
        level = []
        for mb in micro:
            for s in _fastest_fitting(cfg, inv, mb, SAFETY * budget, trained, offload, shards, masked):
                parts = estimate(inv, s)
                level.append((_seconds_per_step(inv, s, effective // mb, parts), s, parts))
        candidates += level
        fitting = [c for c in level if peak(c[2]) <= SAFETY * budget
                   and host_bytes(c[2]) <= HOST_SAFETY * host_available]
        if fitting:
            _, s, parts = min(fitting, key=lambda c: c[0])
            return Plan(s, parts, peak(parts), budget, card, True, effective // s.micro_batch,
                        _changes(cfg, s, effective, gpus), host_bytes=host_bytes(parts),
                        host_available_bytes=host_available, gpus=gpus)
    # nothing fits: report the smallest configuration and the smallest change that would fit
    _, s, parts = min(candidates, key=lambda c: peak(c[2]))
    suggestion = _suggest(cfg, inv, budget)
    if peak(parts) <= SAFETY * budget:  # the GPU would do; the host lacks the memory the offload needs
        suggestion = (f"this plan needs {host_bytes(parts) / GIB:.1f} GiB of host memory for offload and "
                      f"{host_available / GIB:.1f} GiB is available; free host memory or {suggestion}")
    return Plan(s, parts, peak(parts), budget, card, False, effective // s.micro_batch, suggestion=suggestion,
                host_bytes=host_bytes(parts), host_available_bytes=host_available, gpus=gpus)


def _changes(cfg: Config, s: Settings, effective: int, gpus: int = 1) -> dict[str, list]:
    changes = {}
    if gpus > 1 and cfg.train.data_parallel == "auto":
        changes["train.data_parallel"] = ["auto", "fsdp" if s.shards > 1 else "ddp"]
    if s.micro_batch != cfg.train.micro_batch:
        changes["train.micro_batch"] = [cfg.train.micro_batch, s.micro_batch]
        changes["train.grad_accum"] = [cfg.train.grad_accum, effective // s.micro_batch]
    if cfg.train.grad_checkpointing == "auto":
        changes["train.grad_checkpointing"] = ["auto", s.grad_checkpointing]
        if s.checkpointed_layers is not None:
            changes["train.checkpoint_layers"] = [cfg.train.checkpoint_layers, s.checkpointed_layers]
    for name, on in offload_choices(s).items():
        if on and getattr(cfg.offload, name) == "auto":
            changes[f"offload.{name}"] = ["auto", on]
    if s.tiled_mlp and cfg.train.tiled_mlp == "auto":
        changes["train.tiled_mlp"] = ["auto", True]
    return changes


def _suggest(cfg: Config, inv: Inventory, budget: int) -> str:
    ideas = []
    seq = cfg.max_seq_len
    while seq > 64:
        seq //= 2
        if peak(estimate(inv, _settings(cfg, inv, 1, True, seq=seq))) <= SAFETY * budget:
            ideas.append(f"max_seq_len={seq} (with micro_batch=1 and grad_checkpointing=true)")
            break
    if METHODS[cfg.method].base_bits != 4 and METHODS[cfg.method].trains_base != "all":
        if peak(estimate(inv, _settings(cfg, inv, 1, True, method="qlora"))) <= SAFETY * budget:
            ideas.append("method=qlora (4-bit base weights)")
    need = peak(estimate(inv, _settings(cfg, inv, 1, True))) / SAFETY
    cards = sorted((c["usable_gib"], name) for name, c in CARDS.items() if c["usable_gib"] * GIB >= need)
    if cards:
        ideas.append(f"a card with at least {need / GIB:.1f} GiB such as {cards[0][1]}")
    return "; or ".join(ideas) if ideas else "no setting snugtune knows fits, CPU offload included"


def plan_config(cfg: Config, gpu: str | None = None, trained_per_row: list[int] | None = None,
                gpus: int = 1, masked: bool = True) -> Plan:
    """Plan for --gpu, else for the config's budget; 'auto' means the GPU present (or an H100 profile).
    gpus: processes (one GPU each) under torchrun. masked: see plan_for_budget."""
    name = gpu or cfg.budget
    if name == "auto":
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return plan_for_budget(cfg, total, torch.cuda.get_device_name(), trained_per_row=trained_per_row,
                                   gpus=gpus, masked=masked)
        name = "h100"
    size, _, card = budget_bytes(name)
    return plan_for_budget(cfg, size, card, trained_per_row=trained_per_row, gpus=gpus, masked=masked)


def _checkpointing_text(s: Settings) -> str:
    if s.grad_checkpointing and s.checkpointed_layers is not None:
        return f"first {s.checkpointed_layers} blocks"
    return str(s.grad_checkpointing)


def format_plan(plan: Plan) -> str:
    """The breakdown as a table a person reads, like a VRAM budget."""
    width = max(len(k) for k in plan.breakdown) + 2
    lines = [f"{'component':<{width}}{'GiB':>9}", "-" * (width + 9)]
    lines += [f"{k:<{width}}{v / GIB:>9.2f}" for k, v in plan.breakdown.items() if not k.startswith(HOST)]
    lines += ["-" * (width + 9), f"{'predicted peak (transients: the largest one)':<{width}}"
              f"{plan.peak_bytes / GIB:>9.2f}",
              f"{'budget (' + plan.card + ')':<{width}}{plan.budget_bytes / GIB:>9.2f}",
              f"{'headroom':<{width}}{(plan.budget_bytes - plan.peak_bytes) / GIB:>9.2f}"]
    s = plan.settings
    if plan.gpus > 1:
        lines.append(f"\nper GPU, {plan.gpus} GPUs: " + (f"FSDP, weights sharded {s.shards} ways" if s.shards > 1
                                                          else "DDP, each GPU a full replica"))
    lines.append(f"\nsettings: method={s.method} micro_batch={s.micro_batch} grad_accum={plan.grad_accum} "
                 f"max_seq_len={s.max_seq_len} grad_checkpointing={_checkpointing_text(s)} optimizer={s.optimizer} "
                 f"lora r={s.lora_r} on {','.join(s.lora_targets)} offload={_offload_text(s)}"
                 + (" tiled_mlp=True" if s.tiled_mlp else ""))
    if plan.host_bytes:
        lines += [f"{k:<{width}}{v / GIB:>9.2f}" for k, v in plan.breakdown.items() if k.startswith(HOST)]
        lines.append(f"host memory for offload: {plan.host_bytes / GIB:.2f} GiB pinned "
                     f"(available: {plan.host_available_bytes / GIB:.1f} GiB)")
    for key, (asked, chosen) in plan.changes.items():
        lines.append(f"planner chose {key}={chosen} (config: {asked})")
    lines.append("fits" if plan.fits else f"does NOT fit. Try: {plan.suggestion}")
    return "\n".join(lines)



