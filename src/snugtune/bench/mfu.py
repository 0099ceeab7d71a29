"""Model FLOP utilisation beside every bench figure: the model's FLOPs per token (planner.step_time.step_flops:
forward, input gradients, weight gradients of what is trained, causal attention; no recomputation) times the
measured tokens/s, over the dense 16-bit datasheet rate of the card the stack ran on (H100 and H200 989 TFLOP/s,
T4 65). Recomputation is counted apart: what each stack's checkpointing adds, which MFU does not credit. A
preference objective's forwards without gradient (DPO's reference) are work its loss needs: the model's.

The model's FLOPs are the same for every stack on one config: attention counted causal over the whole row
whatever kernel a stack runs (a dense mask or per-document kernels change the work done, not the model's).
"""

from __future__ import annotations

from dataclasses import replace

from snugtune.config import config_from_dict
from snugtune.planner.cards import card_tflops
from snugtune.planner.choose import decisions_for
from snugtune.planner.inventory import inventory_for
from snugtune.planner.plan import Decisions
from snugtune.planner.step_time import step_flops


def planned_decisions(settings: dict) -> Decisions:
    """The Decisions a snugtune result's plan recorded (`plan.settings` of its summary)."""
    known = {k: v for k, v in settings.items() if k in Decisions.__dataclass_fields__}
    return Decisions(**{**known, "lora_targets": tuple(known["lora_targets"])})


def stack_decisions(config: dict, stack: str, result: dict) -> Decisions:
    """What a stack computes on `config`: snugtune its plan's Decisions; plain and Unsloth the config as asked
    (every block recomputed when it checkpoints, as both do)."""
    settings = (result.get("plan") or {}).get("settings")
    if stack == "snugtune" and settings:
        return planned_decisions(settings)
    cfg = config_from_dict(config)
    micro = cfg.train.micro_batch if cfg.train.micro_batch != "auto" else cfg.train.step_rows
    return decisions_for(cfg, inventory_for(cfg), micro, cfg.train.grad_checkpointing is not False, cuda=False)


def utilisation(config: dict, stack: str, result: dict) -> dict:
    """The FLOPs per token a stack's result stands for, and its model FLOP utilisation where its card is known."""
    d = replace(stack_decisions(config, stack, result), attention_mask=False)
    flops = step_flops(inventory_for(config_from_dict(config)), d)
    tokens = d.tokens
    peak = card_tflops(result.get("device", ""), default=None)
    found = {"model_flops_per_token": flops.model / tokens, "recompute_flops_per_token": flops.recompute / tokens,
             "peak_tflops": peak}
    if peak and result.get("tokens_per_s_median_step"):
        rate = result["tokens_per_s_median_step"]
        found["mfu"] = found["model_flops_per_token"] * rate / (peak * 1e12)
        found["mfu_with_recompute"] = (flops.model + flops.recompute) / tokens * rate / (peak * 1e12)
    return found
