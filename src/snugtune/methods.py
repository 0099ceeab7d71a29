"""The five training methods as one table: what each stores quantized, what it trains, what it keeps.

Models, planner and engine read these rows instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    base_bits: Literal[4, 8] | None     # storage of the frozen block linears: nf4, LLM.int8, or 16-bit
    adapters: bool                      # trains LoRA adapters on a frozen base
    trains_base: Literal["none", "last_layers", "all"]  # base weights trained (fp32 masters)
    linears_keep_input: bool            # its linear layers keep their input for backward (LLM.int8 does)
    shards_with_fsdp: bool              # train.data_parallel=fsdp supports it
    streams_weights: bool               # offload.weights can stream its frozen block weights from host memory
    syncs_host: bool                    # its base layers wait on the GPU every call (LLM.int8 finds outlier
                                        # columns with a data-dependent branch), so no CUDA graph can hold a step
    help: str

    @property
    def replays_graphs(self) -> bool:
        """Whether a micro-batch of this method can be captured as a CUDA graph: LoRA on a base that never
        waits on the GPU (full and freeze train base weights, whose optimizer and loss take other paths)."""
        return self.adapters and not self.syncs_host


METHODS: dict[str, Method] = {
    "lora": Method("lora", None, True, "none", False, True, True, False,
                   "LoRA adapters on a frozen 16-bit base"),
    "qlora": Method("qlora", 4, True, "none", False, True, True, False,
                    "LoRA adapters on a frozen 4-bit (nf4) base"),
    "lora-8bit": Method("lora-8bit", 8, True, "none", True, False, False, True,
                        "LoRA adapters on a frozen 8-bit (LLM.int8) base"),
    "freeze": Method("freeze", None, False, "last_layers", False, False, True, False,
                     "the last freeze.trainable_layers blocks trained in full, the rest frozen in 16-bit"),
    "full": Method("full", None, False, "all", False, False, False, False,
                   "every weight trained, fp32 masters"),
}

ADAPTER_METHODS = tuple(name for name, m in METHODS.items() if m.adapters)


def method(name: str) -> Method:
    """The table row for a method name (names are validated by the config)."""
    return METHODS[name]
