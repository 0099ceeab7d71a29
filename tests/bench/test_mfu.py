"""bench.mfu: every bench figure beside the card's limit: the same model FLOPs for every stack on one config,
recomputation apart, utilisation over the card's datasheet rate (none where the card is not known)."""

import pytest

from snugtune.bench.compare import bench_config, format_table
from snugtune.bench.mfu import utilisation
from snugtune.planner.step_time import model_flops_per_token

H100 = "NVIDIA H100 80GB HBM3"


def _snugtune_result(config: dict, checkpointing: bool, device: str, rate: float) -> dict:
    """A snugtune result as the bench reads it: its plan's Decisions (no recomputation here)."""
    from dataclasses import asdict

    from snugtune.bench.mfu import stack_decisions
    d = stack_decisions({**config, "train": {**config["train"], "grad_checkpointing": checkpointing}}, "plain", {})
    settings = {**asdict(d), "lora_targets": list(d.lora_targets)}
    return {"tokens_per_s_median_step": rate, "device": device, "loss_last": 1.0,
            "plan": {"settings": settings, "card": "H100 80 GB", "predicted_step_seconds": 0.5, "grad_accum": 1}}


def test_every_stack_is_credited_the_same_model_flops_and_its_own_recomputation():
    config = bench_config("tiny", 256, 2, 8, None, "cuda")
    snugtune = utilisation(config, "snugtune", _snugtune_result(config, False, H100, 1000.0))
    plain = utilisation(config, "plain", {"tokens_per_s_median_step": 500.0, "device": H100})
    assert snugtune["model_flops_per_token"] == plain["model_flops_per_token"] > 0
    assert snugtune["recompute_flops_per_token"] < plain["recompute_flops_per_token"]  # plain recomputes every block
    assert snugtune["mfu"] == pytest.approx(snugtune["model_flops_per_token"] * 1000.0 / 989e12)
    assert snugtune["mfu"] == pytest.approx(2 * plain["mfu"])
    assert plain["mfu_with_recompute"] > plain["mfu"]


@pytest.mark.parametrize("device,peak", [("NVIDIA H200", 989), ("Tesla T4", 65), ("cpu (2 cores)", None),
                                         ("NVIDIA B300", None)])
def test_utilisation_is_over_the_card_the_stack_ran_on_and_only_a_known_one(device, peak):
    config = bench_config("tiny", 128, 1, 8, None, "auto")
    found = utilisation(config, "plain", {"tokens_per_s_median_step": 100.0, "device": device})
    assert found["peak_tflops"] == peak
    assert ("mfu" in found) == (peak is not None)


def test_model_flops_count_causal_attention_whatever_kernel_ran():
    # a T4's dense mask computes every score; the model needs the causal half: MFU counts the model's
    from dataclasses import replace

    from snugtune.bench.mfu import stack_decisions
    from snugtune.config import config_from_dict
    from snugtune.planner.inventory import inventory_for
    config = bench_config("tiny", 512, 1, 8, None, "cuda")
    result = _snugtune_result(config, True, H100, 100.0)
    result["plan"]["settings"]["attention_mask"] = True
    d = stack_decisions(config, "snugtune", result)
    inv = inventory_for(config_from_dict(config))
    assert utilisation(config, "snugtune", result)["model_flops_per_token"] == \
        model_flops_per_token(inv, replace(d, attention_mask=False)) < model_flops_per_token(inv, d)


def test_the_table_prints_utilisation_and_the_planners_prediction():
    config = bench_config("tiny", 256, 2, 8, None, "cuda")
    result = _snugtune_result(config, False, H100, 1000.0)
    result.update(utilisation(config, "snugtune", result))
    table = format_table({"setting": {}, "snugtune": result, "plain": {"error": "out of memory"}})
    assert f"{result['mfu']:.1%} ({result['mfu_with_recompute']:.1%})" in table
    assert "planned for H100 80 GB: predicted 0.500 s a step (1,024 tok/s at full rows)" in table
    # a DPO plan's rows are pairs: both sequences count
    result["plan"]["settings"]["objective"] = "dpo"
    pairs = format_table({"setting": {}, "snugtune": result})
    assert "planned for H100 80 GB: predicted 0.500 s a step (2,048 tok/s at full rows)" in pairs
