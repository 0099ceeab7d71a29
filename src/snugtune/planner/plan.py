"""The plan: what a run does, decided once by the planner and executed by the engine, which decides nothing again.

A Plan holds the Config the run trains with (every field the planner chose set, none left 'auto'), the
Decisions the engine executes (the split into micro-batches, recomputation, compilation, CUDA graphs, the
dense copy, offload, tiling, sharding, the optimizer) and, where a card was planned for, the memory estimate
and step time behind them. After an out-of-memory error the planner returns the next Plan (apply.step_down).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from snugtune.config import PLANNED_FIELDS, Config
from snugtune.memory_rules import SEQUENCES_PER_ROW

SAFETY = 0.92               # plan to at most this share of the budget


@dataclass(frozen=True)
class Decisions:
    """The run as planned: the config values its memory and speed depend on, and every choice the planner made
    for them. The memory estimate and the step-time model read it; the engine executes it."""
    method: str                  # lora | qlora | lora-8bit | freeze | full
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_last_layers: int | None
    double_quant: bool
    optimizer: str               # adamw | adamw_8bit | paged_adamw_8bit (FSDP: adamw, memory_rules.optimizer_for)
    compute_bytes: int           # 2 for bf16/fp16, 4 for fp32
    micro_batch: int
    max_seq_len: int
    grad_checkpointing: bool
    trainable_layers: int = 2    # method=freeze
    checkpointed_layers: int | None = None  # with checkpointing: blocks (from the first) that recompute; None = all
    lora_dropout: float = 0.0
    trained_tokens: int | None = None  # most trained positions in one micro-batch, from the data; None: all
    offload_activations: bool = False  # engine.offload.ActivationOffload
    stream_weights: bool = False       # engine.offload.WeightStreamer (frozen block weights in host memory)
    shards: int = 1                    # FSDP processes the weights are sharded over (1: not sharded)
    attention_mask: bool = True        # batches carry a mask (several packed samples a row, or padding);
                                       # rows of one sample each run plain causal attention, no mask
    tiled_mlp: bool = False            # engine.tiling: each MLP over the sequence in checkpointed tiles
    embeddings_on_host: bool = False   # engine.offload.HostEmbedding: the frozen input table in host memory
    dense_weights_kept: bool = False   # memory_rules.keeps_dense_weights: a compiled, recomputed 4-bit block
                                       # keeps its LoRA layers' dequantized weights until its backward
    cuda_graphs: bool = False          # memory_rules.replays_cuda_graphs: the step replays from a private pool
    lengths_vary: bool = False         # the data's sequences pad to several lengths: micro-batches of shapes not
                                       # captured run eagerly beside the graphs' pool (preference objectives)
    tail_share: float = 0.0            # an epoch's last micro-batch holds this share of a full one's rows (0: it
                                       # is full): another shape, first run eagerly beside the graphs' pool
    dense_copy: bool = False           # engine.dense_copy: 4-bit block weights also held dequantized
    lean_norms: bool = False           # memory_rules.leans_norms: norms keep their 16-bit input, not fp32
    head_groups: int = 1               # memory_rules.tiles_attention: attention differentiated by groups of heads
    compiled_blocks: bool = False      # memory_rules.compiles_blocks: each block compiled with torch.compile
    fused_lora: bool = False           # memory_rules.fuses_lora: each LoRA layer one autograd function
    grad_accum: int = 1                # micro-batches per optimizer step in each process
    objective: str = "sft"             # sft | dpo | orpo | kto: dpo and orpo rows hold two sequences (a pair)
    reference: str = "none"            # memory_rules.reference_for: none | adapter | copy | precomputed

    @property
    def row_tokens(self) -> int:
        """Tokens a row holds at most: max_seq_len for each of its sequences (a preference pair's two)."""
        return self.max_seq_len * SEQUENCES_PER_ROW[self.objective]

    @property
    def tokens(self) -> int:
        """Tokens a micro-batch holds at most."""
        return self.micro_batch * self.row_tokens

    @property
    def data_parallel(self) -> str:
        """What several processes do with the model: shard it (fsdp) or replicate it (ddp)."""
        return "fsdp" if self.shards > 1 else "ddp"


class Offload(NamedTuple):
    """Config `offload.<name>` choices; fields in the order of OFFLOAD_NAMES, cheapest first."""
    embeddings: bool = False
    activations: bool = False
    weights: bool = False


NO_OFFLOAD = Offload()
OFFLOAD_NAMES = Offload._fields


def offload_text(offload: Offload) -> str:
    return "+".join(name for name, on in offload._asdict().items() if on) or "none"


@dataclass(frozen=True)
class Plan:
    config: Config                 # the Config the run trains with: the asked one with every planned field set
    decisions: Decisions
    breakdown: dict = field(default_factory=dict)  # planner.memory.Part -> bytes; {} when planned without a card
    peak_bytes: int = 0
    budget_bytes: int = 0
    card: str | None = None        # None: planned without a card (the CPU under budget: auto), so no estimate
    fits: bool = True
    changes: dict[str, list] = field(default_factory=dict)   # field -> [asked, chosen]
    suggestion: str | None = None
    host_bytes: int = 0            # pinned host memory the offload holds
    host_available_bytes: int = 0
    gpus: int = 1
    step_seconds: float = 0.0      # predicted time of one optimizer step (step_time.seconds_per_step)
    cuda: bool = True              # planned for a run on a CUDA GPU (False: the CPU, whatever the budget)

    @property
    def grad_accum(self) -> int:
        return self.decisions.grad_accum

    @property
    def offload(self) -> Offload:
        d = self.decisions
        return Offload(d.embeddings_on_host, d.offload_activations, d.stream_weights)

    def to_json(self) -> dict:
        from snugtune.planner.memory import alive_at_peak
        at_peak = alive_at_peak(self.breakdown)
        return {"peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "card": self.card, "safety": SAFETY,
                "breakdown": {k.name.lower(): v for k, v in self.breakdown.items()},
                "not_alive_at_peak": [k.name.lower() for k in self.breakdown if k not in at_peak],
                "host_bytes": self.host_bytes, "host_available_bytes": self.host_available_bytes,
                "predicted_step_seconds": self.step_seconds,
                "settings": {**asdict(self.decisions), "grad_accum": self.grad_accum,
                             "offload": offload_text(self.offload), "lora_targets": list(self.decisions.lora_targets)},
                "changes": self.changes, "suggestion": self.suggestion}


def _field(config: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def resolved_config(asked: Config, decisions: Decisions) -> Config:
    """The Config a run trains with under `decisions`: every planned field (config.PLANNED_FIELDS) set."""
    sections: dict[str, dict] = {}
    for dotted, (decided, _) in PLANNED_FIELDS.items():
        section, name = dotted.split(".")
        sections.setdefault(section, {})[name] = getattr(decisions, decided)
    return asked.model_copy(update={section: getattr(asked, section).model_copy(update=values)
                                    for section, values in sections.items()})


def planned_differences(old: Config, new: Config) -> dict[str, list]:
    """Planned field -> [old, new] for the planned fields whose value differs."""
    return {f: [_field(old, f), _field(new, f)] for f in PLANNED_FIELDS if _field(old, f) != _field(new, f)}


def needs_new_model(old: Config, new: Config) -> bool:
    """Whether going from `old` to `new` changes the model (offload, checkpointing, tiling, dense copy, ...), not
    just how the loop splits the rows or whether it replays graphs."""
    return any(PLANNED_FIELDS[f][1] for f in planned_differences(old, new))
