"""planner.step_time: the step-time model ranks what a user would notice (launches, recomputation, copies, a slower
card), splits the model's FLOPs from the recomputation's, and stays within 25% of every recorded step time."""

import json
from dataclasses import replace
from functools import lru_cache

import pytest
from transformers import LlamaConfig

from conftest import REPO_ROOT, planner_decisions
from snugtune.memory_rules import MLP_TILE_TOKENS
from snugtune.planner.inventory import inventory_from_config
from snugtune.planner.memory import estimate
from snugtune.planner.step_time import (DEQUANTIZE_BYTES_PER_WEIGHT, dequantize_bytes, model_flops_per_token,
                                        seconds_per_step, step_flops)

STEP_TIME_ROWS = REPO_ROOT / "docs" / "runs" / "step_time_rows.jsonl"


def _seconds(inv, accum: int, card: str = "h100", **changes) -> float:
    s = planner_decisions(**changes)
    return seconds_per_step(inv, s, accum, estimate(inv, s), card)


def _big():
    return inventory_from_config(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))


def test_fewer_larger_micro_batches_and_graphs_cost_less_launching(tiny_llama_inventory):
    inv = tiny_llama_inventory
    assert _seconds(inv, 1, micro_batch=8) < _seconds(inv, 4, micro_batch=2) < _seconds(inv, 8, micro_batch=1)
    assert _seconds(inv, 4, micro_batch=2, cuda_graphs=True) < _seconds(inv, 4, micro_batch=2)


def test_recomputation_host_copies_and_a_slower_card_cost_time(tiny_llama_inventory):
    inv = tiny_llama_inventory
    long = dict(micro_batch=64, max_seq_len=8192, cuda_graphs=True)  # big enough to be bound by the GPU
    assert _seconds(inv, 1, grad_checkpointing=False, **long) < _seconds(inv, 1, **long)
    assert _seconds(inv, 1, **long) < _seconds(inv, 1, "t4", **long)
    assert _seconds(inv, 1, micro_batch=1, max_seq_len=100_000, grad_checkpointing=False) < \
        _seconds(inv, 1, micro_batch=1, max_seq_len=100_000, grad_checkpointing=False, offload_activations=True)


def test_dequantizing_costs_a_pass_per_forward_and_backward_and_nothing_with_a_dense_copy(tiny_llama_inventory):
    inv = tiny_llama_inventory
    one_pass = inv.linear_params * DEQUANTIZE_BYTES_PER_WEIGHT
    assert dequantize_bytes(inv, planner_decisions(grad_checkpointing=False)) == 2 * one_pass
    assert dequantize_bytes(inv, planner_decisions(grad_checkpointing=True)) == 3 * one_pass
    # backward reuses the recomputed forward's
    assert dequantize_bytes(inv, planner_decisions(grad_checkpointing=True, dense_weights_kept=True)) == 2 * one_pass
    # ... only in the blocks that recompute: the others dequantize in forward and again in backward
    half = planner_decisions(grad_checkpointing=True, dense_weights_kept=True, checkpointed_layers=inv.layers // 2)
    assert dequantize_bytes(inv, half) == pytest.approx(2 * one_pass)
    assert dequantize_bytes(inv, planner_decisions(dense_copy=True)) == 0
    assert dequantize_bytes(inv, planner_decisions(method="lora")) == 0  # 16-bit base: nothing to do
    assert _seconds(inv, 1, dense_copy=True, cuda_graphs=True) < _seconds(inv, 1, cuda_graphs=True)
    # a card with a tenth of the bandwidth and the same arithmetic spends ten times as long dequantizing
    from snugtune.planner.step_time import memory_seconds
    s = planner_decisions(micro_batch=1, max_seq_len=1)
    assert memory_seconds(inv, s, "l4") == pytest.approx(memory_seconds(inv, s, "h200") * 4800 / 300)


def test_tiled_mlps_and_grouped_attention_are_recomputation_not_model_flops():
    big = _big()
    long = dict(micro_batch=1, max_seq_len=4 * MLP_TILE_TOKENS, attention_mask=False)
    tokens = 4 * MLP_TILE_TOKENS
    plain, tiled, grouped = (step_flops(big, planner_decisions(**long, **more))
                             for more in ({}, {"tiled_mlp": True}, {"head_groups": 8}))
    mlp_params = 2 * 3 * 256 * 1024  # two blocks x gate, up, down
    assert tiled.model == plain.model == grouped.model  # the same model, trained the same way
    assert tiled.recompute - plain.recompute == 2 * mlp_params * tokens
    # attention by groups of heads: one more causal attention forward (2 FLOPs x q_dim x length per token)
    assert grouped.recompute - plain.recompute == 2 * 2 * 256 * tokens * tokens


@pytest.mark.parametrize("method,weight_gradients", [("qlora", 0), ("lora", 0), ("full", 1)])
def test_model_flops_are_4n_for_a_frozen_base_and_6n_trained_plus_attention(method, weight_gradients):
    big = _big()
    s = planner_decisions(method=method, micro_batch=2, max_seq_len=512, attention_mask=False,
                          grad_checkpointing=True, lora_targets=("q_proj",), lora_r=4)
    n = 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024) + 1000 * 256  # blocks' linears + the head
    low_rank = 0 if method == "full" else 2 * 4 * (256 + 256)  # q_proj's A and B in two blocks
    attention = 3 * 2 * 2 * 256 * 512  # causal: half of 2 x 2 x q_dim x length, backward twice the forward
    assert model_flops_per_token(big, s) == (4 + 2 * weight_gradients) * n + 6 * low_rank + attention
    # recomputing every block adds one forward of the blocks, not counted as the model's
    flops = step_flops(big, s)
    assert flops.recompute > 0 and flops.model == model_flops_per_token(big, s) * 1024


def test_packed_rows_under_a_dense_mask_compute_every_score():
    big = _big()
    causal = step_flops(big, planner_decisions(attention_mask=False, max_seq_len=1024))
    masked = step_flops(big, planner_decisions(attention_mask=True, max_seq_len=1024))
    assert masked.attention == 2 * causal.attention and masked.matmul == causal.matmul


@lru_cache(maxsize=None)
def _inventory(shape: str):
    from snugtune.config import config_from_dict
    from snugtune.planner.inventory import inventory_for
    return inventory_for(config_from_dict({"model": f"shape:{shape}", "data": {"path": "unused"}}))


def _recorded_rows() -> list[dict]:
    return [json.loads(line) for line in STEP_TIME_ROWS.read_text().splitlines() if line.strip()]


def test_every_recorded_step_time_is_predicted_within_25_percent_or_says_why_not():
    from snugtune.planner.plan import Decisions
    rows = _recorded_rows()
    assert len([r for r in rows if r["held"]]) >= 25  # the bench records and probes of docs/runs
    outside = []
    for row in rows:
        assert row["held"] or row["reason"], row["source"]
        if not row["held"]:
            continue
        inv = _inventory(row["model"])
        d = Decisions(**{**row["decisions"], "lora_targets": tuple(row["decisions"]["lora_targets"])})
        predicted = seconds_per_step(inv, d, row["grad_accum"], estimate(inv, d), row["device"])
        if abs(predicted / row["measured_step_s"] - 1) > 0.25:
            outside.append((row["source"], round(predicted / row["measured_step_s"], 2)))
    assert not outside, outside


def test_a_pair_counts_both_sequences_and_dpo_and_kto_their_forwards_without_gradient():
    big = _big()
    sft = planner_decisions(micro_batch=1, max_seq_len=512, attention_mask=False, grad_checkpointing=True)
    n = 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024) + 1000 * 256
    forward_attention = 2 * 2 * 256 * 512  # per token, causal over one 512-token sequence
    one = step_flops(big, sft)
    orpo = step_flops(big, replace(sft, objective="orpo"))
    assert orpo.model == 2 * one.model and orpo.recompute == 2 * one.recompute  # chosen and rejected
    for reference in ("adapter", "copy", "precomputed"):  # precomputed: the same pass, before training
        dpo = step_flops(big, replace(sft, objective="dpo", reference=reference))
        assert dpo.model == orpo.model + 1024 * (2 * n + forward_attention)
    kto = step_flops(big, replace(sft, objective="kto", reference="adapter"))  # reference twice, policy once
    assert kto.model == one.model + 3 * 512 * (2 * n + forward_attention)
    inv = big
    slower = [seconds_per_step(inv, d, 1, estimate(inv, d), "h100")
              for d in (replace(sft, objective="orpo"), replace(sft, objective="dpo", reference="adapter"))]
    assert slower[1] > slower[0]
