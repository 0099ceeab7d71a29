"""planner.choose: the search for the fastest settings that fit a budget."""

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES_DIR, tiny_config
from snugtune.config import load_config
from snugtune.planner.choose import plan_for_budget, tail_share
from snugtune.planner.cards import GIB, budget_bytes
from snugtune.planner.inventory import inventory_for
from snugtune.planner.memory import Part, estimate, host_bytes, peak
from snugtune.planner.plan import Decisions
from snugtune.planner.step_time import seconds_per_step, step_flops

RECIPES = [p for p in sorted(EXAMPLES_DIR.glob("*.yaml")) if "cpu" not in p.stem]


def test_search_tiles_mlps_only_for_rows_longer_than_a_tile_that_do_not_fit_otherwise(tmp_path, alpaca_file):
    def plan(seq: int, gib: int):
        cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=seq,
                          train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
        return plan_for_budget(cfg, gib * GIB, f"{gib} GiB", host_available=64 * GIB, masked=False)
    long = plan(49152, 15)
    assert long.fits and long.decisions.tiled_mlp and long.changes["train.tiled_mlp"] == ["auto", True]
    assert not plan(49152, 80).decisions.tiled_mlp  # fits without: no extra MLP forward
    assert not plan(4096, 8).decisions.tiled_mlp    # rows within one tile: tiling would change nothing


def test_search_prefers_no_checkpointing_when_it_fits_and_keeps_the_effective_batch(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=4096,
                      train={"micro_batch": 4, "grad_accum": 2, "grad_checkpointing": "auto"})
    roomy = plan_for_budget(cfg.model_copy(update={"max_seq_len": 1024}), 80 * GIB, "h100")
    assert roomy.fits and roomy.decisions.grad_checkpointing is False and roomy.decisions.micro_batch == 4
    long = plan_for_budget(cfg, 80 * GIB, "h100")  # 4 x 4096 without recomputation would not fit: split
    assert long.fits and long.decisions.micro_batch * long.grad_accum == 8
    small = plan_for_budget(cfg, 15 * GIB, "t4")
    assert small.fits and small.peak_bytes <= 0.92 * 15 * GIB
    assert small.decisions.micro_batch * small.grad_accum == 8  # effective batch kept
    assert small.decisions.grad_checkpointing is True or small.decisions.micro_batch < 4
    assert small.changes


def test_compiled_blocks_recompute_as_few_blocks_as_fit(tmp_path, alpaca_file):
    # measured faster than recomputing every block under a 15 GiB cap (H100, 2026-12-07; choose.py)
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_accum": 4, "grad_checkpointing": "auto"})
    plan = plan_for_budget(cfg, 15 * GIB, "h100")
    assert plan.fits and plan.decisions.compiled_blocks and plan.decisions.grad_checkpointing
    assert 0 < plan.decisions.checkpointed_layers < 32 and plan.config.train.checkpoint_layers == \
        plan.decisions.checkpointed_layers
    one_more = replace(plan.decisions, checkpointed_layers=plan.decisions.checkpointed_layers - 1)
    assert peak(estimate(inventory_for(cfg), one_more)) > 0.92 * 15 * GIB  # the fewest that fit
    everything = replace(plan.decisions, checkpointed_layers=None)
    assert plan.step_seconds < seconds_per_step(inventory_for(cfg), everything, 4,
                                                estimate(inventory_for(cfg), everything), "h100")
    roomy = plan_for_budget(cfg, 80 * GIB, "h100")
    assert roomy.fits and not roomy.decisions.grad_checkpointing


def test_activation_offload_recomputes_what_the_hosts_memory_needs_and_no_more_than_pays(tmp_path, alpaca_file):
    # 28,672 tokens under 15 GiB (H100, 2026-12-07): the fewest recomputed blocks that fit the GPU left 125 GiB of
    # activations for the host, so the search fell through to weight streaming (measured 5.0 s a step; 4.4 s
    # with every block recomputed and its input offloaded, 2026-12-01)
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=28672,
                      train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
    inv, card = inventory_for(cfg), "NVIDIA H100 80GB HBM3"
    for host_gib in (120, 24, 12):
        plan = plan_for_budget(cfg, 15 * GIB, card, trained_per_row=[28672], host_available=host_gib * GIB,
                               masked=False, lengths_vary=False)
        d = plan.decisions
        assert plan.fits and d.offload_activations and not d.stream_weights and d.compiled_blocks
        assert plan.host_bytes <= 0.9 * host_gib * GIB
        # the fastest of every count of recomputed blocks whose offload fits the host
        counts = [replace(d, checkpointed_layers=k) for k in range(1, 32)] + [replace(d, checkpointed_layers=None)]
        fitting = [c for c in counts if host_bytes(estimate(inv, c)) <= 0.9 * host_gib * GIB]
        assert plan.step_seconds == min(seconds_per_step(inv, c, 1, estimate(inv, c), card) for c in fitting)


def test_offloaded_activations_cost_their_copy_back_in_the_step(tmp_path, alpaca_file):
    # backward copies each offloaded tensor back on the compute stream when it reaches it (engine.offload):
    # keeping 4 more blocks' activations (15 GiB more to copy back) costs more than recomputing them
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=28672,
                      train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
    inv, card = inventory_for(cfg), "NVIDIA H100 80GB HBM3"
    plan = plan_for_budget(cfg, 15 * GIB, card, trained_per_row=[28672], host_available=120 * GIB, masked=False)
    every = plan.decisions
    assert every.offload_activations and every.checkpointed_layers is None
    four_kept = replace(every, checkpointed_layers=28)
    assert seconds_per_step(inv, every, 1, estimate(inv, every), card) < \
        seconds_per_step(inv, four_kept, 1, estimate(inv, four_kept), card)
    assert step_flops(inv, four_kept).recompute < step_flops(inv, every).recompute


def test_dense_copy_of_4bit_weights_is_held_only_where_it_fits_beside_the_fastest_settings(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
    roomy = plan_for_budget(cfg, 80 * GIB, "h100", host_available=64 * GIB)
    n_lin = inventory_for(cfg).linear_params
    assert roomy.decisions.dense_copy and roomy.breakdown[Part.DENSE_COPY] == 2 * n_lin  # 13 GiB of bf16
    assert roomy.changes["quant.dense_copy"] == ["auto", True] and not roomy.decisions.grad_checkpointing
    without = plan_for_budget(cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"dense_copy": False})}),
                              80 * GIB, "h100", host_available=64 * GIB)
    assert not without.decisions.dense_copy and Part.DENSE_COPY not in without.breakdown
    assert roomy.step_seconds < without.step_seconds  # no dequantization in the step
    small = plan_for_budget(cfg, 15 * GIB, "t4", host_available=64 * GIB)  # 13 GiB of copies cannot fit
    assert small.fits and not small.decisions.dense_copy
    long = plan_for_budget(cfg.model_copy(update={"max_seq_len": 32768}), 15 * GIB, "15 GiB",
                           host_available=64 * GIB, masked=False)
    assert long.fits and any(long.offload)
    assert not long.decisions.dense_copy  # offloading: memory is short


def test_search_fills_the_card_with_partial_checkpointing_when_blocks_run_eagerly(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_accum": 4, "grad_checkpointing": "auto", "compile": False})
    plan = plan_for_budget(cfg, 15 * GIB, "t4")
    assert plan.fits and plan.decisions.grad_checkpointing
    assert 0 < plan.decisions.checkpointed_layers < 32 and plan.changes["train.checkpoint_layers"][1] > 0
    # the fewest recomputed blocks that fit: one fewer would not
    fewer = Decisions(**{**plan.decisions.__dict__, "checkpointed_layers": plan.decisions.checkpointed_layers - 1})
    assert peak(estimate(inventory_for(cfg), fewer)) > 0.92 * 15 * GIB >= plan.peak_bytes


def test_plan_for_several_gpus_shards_with_fsdp_only_when_replicas_do_not_fit(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="lora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_checkpointing": "auto"}, offload={"weights": False})
    replicas = plan_for_budget(cfg, 40 * GIB, "a100-40", gpus=2, host_available=64 * GIB)
    assert replicas.fits and replicas.decisions.shards == 1 and replicas.changes["train.data_parallel"][1] == "ddp"
    sharded = plan_for_budget(cfg, 17 * GIB, "17 GiB", gpus=2, host_available=64 * GIB)
    assert sharded.fits and sharded.decisions.shards == 2 and sharded.changes["train.data_parallel"][1] == "fsdp"
    assert sharded.breakdown[Part.FROZEN_WEIGHTS] < 7 * GIB  # half of the 8B's 13 GiB of blocks
    alone = plan_for_budget(cfg, 17 * GIB, "17 GiB", gpus=1, host_available=64 * GIB)
    assert alone.fits and any(alone.offload) and not any(sharded.offload)  # one card holds it only offloading
    for plan in (replicas, sharded):  # the fast path in every process, but no CUDA graphs (memory_rules)
        d = plan.decisions
        assert d.compiled_blocks and d.fused_lora and not d.cuda_graphs, d
    result = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(_write(tmp_path, cfg)), "--gpu", "17GiB",
                             "--gpus", "2", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["shards"] == 2


def _write(tmp_path, cfg):
    import yaml
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_auto_micro_batch_takes_the_fastest_split_of_the_rows_that_fits(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=1024,
                      lora={"dropout": 0.0}, train={"micro_batch": "auto", "rows_per_step": 8,
                                                    "grad_checkpointing": "auto"})
    roomy = plan_for_budget(cfg.model_copy(update={"max_seq_len": 256}), 79 * GIB, "h100", host_available=64 * GIB)
    assert roomy.fits and (roomy.decisions.micro_batch, roomy.grad_accum) == (8, 1)  # one micro-batch a step
    assert roomy.changes["train.micro_batch"] == ["auto", 8]
    small = plan_for_budget(cfg, 10 * GIB, "10 GiB", host_available=64 * GIB)
    assert small.fits and small.decisions.micro_batch * small.grad_accum == 8 and small.peak_bytes <= 0.92 * 10 * GIB
    fixed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch": 1, "grad_accum": 8,
                                                                        "rows_per_step": None})})
    one_at_a_time = plan_for_budget(fixed, 10 * GIB, "10 GiB", host_available=64 * GIB)
    assert one_at_a_time.decisions.micro_batch == 1 and small.step_seconds <= one_at_a_time.step_seconds
    assert small.to_json()["predicted_step_seconds"] == small.step_seconds > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_shipped_recipe_runs_one_micro_batch_a_step_or_the_largest_that_fits(path):
    cfg = load_config(path)
    size, _, card = budget_bytes(cfg.budget)
    gpus = 1 if cfg.train.data_parallel == "auto" else 2  # a recipe that names DDP or FSDP runs under torchrun
    plan = plan_for_budget(cfg, size, card, host_available=64 * GIB, gpus=gpus)
    assert plan.fits and cfg.train.micro_batch == "auto"
    rows, chosen = cfg.train.step_rows, plan.decisions.micro_batch
    larger = [m for m in range(chosen + 1, rows + 1) if rows % m == 0]
    if larger:  # the next split up is not a faster plan that fits
        train = cfg.train.model_copy(update={"micro_batch": larger[0], "grad_accum": rows // larger[0],
                                             "rows_per_step": None})
        bigger = plan_for_budget(cfg.model_copy(update={"train": train}), size, card, host_available=64 * GIB,
                                 gpus=gpus)
        assert not bigger.fits or bigger.step_seconds >= plan.step_seconds


def test_plan_without_the_data_counts_a_dense_mask_only_for_packed_rows_on_cards_without_varlen(tmp_path, alpaca_file):
    from snugtune.planner.choose import plan_config
    packed = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=4096)
    padded = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=4096,
                         data={"packing": False})
    assert Part.ATTENTION_MASK in plan_config(packed, "t4").breakdown  # compute 7.5: no varlen flash kernel
    assert Part.ATTENTION_MASK not in plan_config(packed, "l4").breakdown
    assert Part.ATTENTION_MASK not in plan_config(padded, "t4").breakdown  # right padding needs no mask


@pytest.mark.parametrize("rows, micro_batch, gpus, share", [(23, 2, 1, 0.5), (24, 2, 1, 0.0), (10, 4, 1, 0.5),
                                                            (23, 2, 2, 0.0), (25, 4, 2, 0.25), (5, 1, 1, 0.0)])
def test_the_last_micro_batch_of_an_epoch_holds_what_the_rows_leave(rows, micro_batch, gpus, share):
    assert tail_share([100] * rows, micro_batch, gpus) == share
    assert tail_share(None, micro_batch, gpus) == 0.0  # the data not read
