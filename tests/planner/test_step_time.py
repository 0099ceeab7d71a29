"""planner.step_time: the step-time model ranks what a user would notice: launches, recomputation, copies."""

from conftest import planner_settings
from snugtune.planner.memory import estimate
from snugtune.planner.step_time import seconds_per_step


def _seconds(inv, accum: int, card: str = "h100", **changes) -> float:
    s = planner_settings(**changes)
    return seconds_per_step(inv, s, accum, estimate(inv, s), card)


def test_fewer_larger_micro_batches_and_graphs_cost_less_launching(tiny_llama_inventory):
    inv = tiny_llama_inventory
    assert _seconds(inv, 1, micro_batch=8) < _seconds(inv, 4, micro_batch=2) < _seconds(inv, 8, micro_batch=1)
    assert _seconds(inv, 4, micro_batch=2, cuda_graphs=True) < _seconds(inv, 4, micro_batch=2)


def test_recomputation_host_copies_and_a_slower_card_cost_time(tiny_llama_inventory):
    inv = tiny_llama_inventory
    long = dict(micro_batch=4, max_seq_len=4096)
    assert _seconds(inv, 1, grad_checkpointing=False, **long) < _seconds(inv, 1, **long)
    assert _seconds(inv, 1, **long) < _seconds(inv, 1, offload_activations=True, **long)
    assert _seconds(inv, 1, **long) < _seconds(inv, 1, "t4", **long)


def test_dequantizing_costs_a_pass_per_forward_and_backward_and_nothing_with_a_dense_copy(tiny_llama_inventory):
    from snugtune.planner.step_time import DEQUANTIZE_S_PER_WEIGHT, dequantize_seconds
    inv = tiny_llama_inventory
    one_pass = inv.linear_params * DEQUANTIZE_S_PER_WEIGHT  # on an H100-rate card
    assert dequantize_seconds(inv, planner_settings(grad_checkpointing=False), "h100") == 2 * one_pass
    assert dequantize_seconds(inv, planner_settings(grad_checkpointing=True), "h100") == 3 * one_pass
    assert dequantize_seconds(inv, planner_settings(grad_checkpointing=True, dense_weights_kept=True), "h100") == \
        2 * one_pass  # backward reuses the recomputed forward's
    assert dequantize_seconds(inv, planner_settings(dense_copy=True), "h100") == 0
    assert dequantize_seconds(inv, planner_settings(method="lora"), "h100") == 0  # 16-bit base: nothing to do
    assert _seconds(inv, 1, dense_copy=True) < _seconds(inv, 1)
