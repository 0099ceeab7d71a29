"""planner.step_time: the step-time model ranks what a user would notice: launches, recomputation, copies."""

from transformers import LlamaConfig

from conftest import planner_decisions
from snugtune.memory_rules import MLP_TILE_TOKENS
from snugtune.planner.inventory import inventory_from_config
from snugtune.planner.memory import estimate
from snugtune.planner.step_time import seconds_per_step, step_flops


def _seconds(inv, accum: int, card: str = "h100", **changes) -> float:
    s = planner_decisions(**changes)
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
    assert dequantize_seconds(inv, planner_decisions(grad_checkpointing=False), "h100") == 2 * one_pass
    assert dequantize_seconds(inv, planner_decisions(grad_checkpointing=True), "h100") == 3 * one_pass
    assert dequantize_seconds(inv, planner_decisions(grad_checkpointing=True, dense_weights_kept=True), "h100") == \
        2 * one_pass  # backward reuses the recomputed forward's
    assert dequantize_seconds(inv, planner_decisions(dense_copy=True), "h100") == 0
    assert dequantize_seconds(inv, planner_decisions(method="lora"), "h100") == 0  # 16-bit base: nothing to do
    assert _seconds(inv, 1, dense_copy=True) < _seconds(inv, 1)


def test_tiled_mlps_and_grouped_attention_cost_one_more_forward_of_each():
    big = inventory_from_config(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    long = dict(micro_batch=1, max_seq_len=4 * MLP_TILE_TOKENS, attention_mask=False)
    mlp_params = 2 * 3 * 256 * 1024  # two blocks x gate, up, down
    assert step_flops(big, planner_decisions(**long, tiled_mlp=True)) - step_flops(big, planner_decisions(**long)) == \
        2 * mlp_params * 4 * MLP_TILE_TOKENS
    # attention by groups of heads: one more causal attention forward (2 FLOPs x q_dim x length per token)
    tokens = 4 * MLP_TILE_TOKENS
    assert step_flops(big, planner_decisions(**long, head_groups=8)) - step_flops(big, planner_decisions(**long)) == \
        2 * 2 * 256 * tokens * tokens
