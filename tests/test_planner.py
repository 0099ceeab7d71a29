"""The planner: component arithmetic on a hand-checkable config, the search, exit 3, OOM re-planning."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

from conftest import tiny_config
from snugtune.errors import ConfigError
from snugtune.engine import train as train_module
from snugtune.engine.train import train
from snugtune.planner import plan_for_budget
from snugtune.planner.cards import GIB, budget_bytes
from snugtune.planner.memory import (Settings, activation_bytes_per_token_layer, estimate, inventory_from_config,
                                     optimizer_bytes, peak, peak_allocated, trainable_params, weight_bytes)

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def inv():
    return inventory_from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                             tie_word_embeddings=False))


def settings(**changes):
    base = dict(method="qlora", lora_r=4, lora_targets=SEVEN, lora_last_layers=None, double_quant=True,
                optimizer="adamw", compute_bytes=2, micro_batch=2, max_seq_len=100, grad_checkpointing=True)
    return Settings(**{**base, **changes})


def test_inventory_counts_every_parameter(inv):
    # per block: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    assert inv.linear_params == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert inv.other_params == 2 * 64000 + 2 * 2 * 64 + 64  # embeddings, lm_head, 2 norms per block, final norm
    assert (inv.q_dim, inv.kv_dim, inv.heads) == (64, 32, 4)


def test_weight_bytes_per_method(inv):
    n = inv.linear_params  # 73,728
    q4 = weight_bytes(inv, settings())
    assert q4["quantized weights (4-bit + block scales)"] == int(n / 2 + n / 64 * (1 + 4 / 256))
    assert q4["16-bit weights kept (embeddings, norms, lm_head)"] == 2 * inv.other_params
    assert weight_bytes(inv, settings(double_quant=False))["quantized weights (4-bit + block scales)"] == n // 2 + n // 16
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert weight_bytes(inv, settings(method="lora-8bit"))["quantized weights (8-bit + row scales)"] == n + 4 * rows
    assert weight_bytes(inv, settings(method="lora"))["frozen 16-bit weights"] == 2 * n


def test_lora_and_optimizer_bytes(inv):
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # r x (in + out) for the seven
    assert trainable_params(inv, settings()) == 2 * per_block == 8192
    assert optimizer_bytes(inv, settings()) == {"LoRA parameters (fp32)": 4 * 8192, "LoRA gradients (fp32)": 4 * 8192,
                                                "optimizer state (adamw)": 8 * 8192}
    assert optimizer_bytes(inv, settings(optimizer="adamw_8bit"))["optimizer state (adamw_8bit)"] == 2 * 8192
    assert trainable_params(inv, settings(lora_last_layers=1)) == per_block


def test_activations_with_and_without_checkpointing(inv):
    per_token = activation_bytes_per_token_layer(inv, settings())
    # norms: 2 x fp32 copy of 64; attention: q, k, v (repeated to 4 heads), output 4*2*64, fp32 lse per head,
    # mask bias 2 bytes x 100 positions; SwiGLU: gate, up, act(gate) 3*2*128;
    # LoRA: the 16-bit input copy + rank-4 output for each of the seven (six read 64, down_proj reads 128)
    assert per_token == 2 * 4 * 64 + (4 * 2 * 64 + 4 * 4 + 2 * 100) + 3 * 2 * 128 + (6 * (2 * 64 + 8) + (2 * 128 + 8))
    # dropout keeps a 1-byte mask per adapted input; LLM.int8 layers keep their inputs (hidden x2, q, MLP)
    assert activation_bytes_per_token_layer(inv, settings(lora_dropout=0.05)) == per_token + 6 * 64 + 128
    assert activation_bytes_per_token_layer(inv, settings(method="lora-8bit")) == \
        per_token + 2 * (64 + 64 + 128) + 2 * 64
    tokens = 2 * 100
    with_ckpt = estimate(inv, settings())
    assert with_ckpt["checkpointed block inputs"] == 2 * 64 * 2 * tokens
    assert with_ckpt["one block recomputed + its gradients"] == per_token * tokens + 2 * 64 * 2 * tokens
    assert with_ckpt["attention mask (packed rows)"] == 2 * 100 * 100
    without = estimate(inv, settings(grad_checkpointing=False))
    assert without["activations (blocks with gradients)"] == 2 * per_token * tokens
    assert peak(without) > peak(with_ckpt)
    # LoRA on the last block only: nothing below it keeps activations
    last = estimate(inv, settings(grad_checkpointing=False, lora_last_layers=1))
    assert last["activations (blocks with gradients)"] == per_token * tokens
    # rows of one sample each (long documents): plain causal attention, no seq x seq mask or bias
    unmasked = estimate(inv, settings(attention_mask=False))
    assert "attention mask (packed rows)" not in unmasked
    assert activation_bytes_per_token_layer(inv, settings(attention_mask=False)) == per_token - 2 * 100


def test_tiled_mlp_bounds_the_recomputed_block_and_costs_one_more_mlp_forward():
    from snugtune.planner.memory import MLP_TILE_TOKENS, step_flops
    big = inventory_from_config(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    long = dict(micro_batch=1, max_seq_len=4 * MLP_TILE_TOKENS, attention_mask=False)
    plain, tiled = estimate(big, settings(**long)), estimate(big, settings(**long, tiled_mlp=True))
    key = "one block recomputed + its gradients"
    assert tiled[key] < plain[key] * 0.75 and peak(tiled) < peak(plain)
    assert estimate(big, settings(tiled_mlp=True))[key] > estimate(big, settings())[key]  # short rows: no gain
    mlp_params = 2 * 3 * 256 * 1024  # two blocks x gate, up, down
    assert step_flops(big, settings(**long, tiled_mlp=True)) - step_flops(big, settings(**long)) == \
        2 * mlp_params * 4 * MLP_TILE_TOKENS


def test_search_tiles_mlps_only_for_rows_longer_than_a_tile_that_do_not_fit_otherwise(tmp_path, alpaca_file):
    def plan(seq: int, gib: int):
        cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=seq,
                          train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
        return plan_for_budget(cfg, gib * GIB, f"{gib} GiB", host_available=64 * GIB, masked=False)
    long = plan(32768, 15)
    assert long.fits and long.settings.tiled_mlp and long.changes["train.tiled_mlp"] == ["auto", True]
    assert not plan(32768, 80).settings.tiled_mlp  # fits without: no extra MLP forward
    assert not plan(4096, 8).settings.tiled_mlp    # rows within one tile: tiling would change nothing


def test_compiled_recomputed_4bit_block_keeps_its_dense_weights_only_without_offload(tmp_path, alpaca_file, inv):
    # engine.speedups.dense_weights_kept_in: one block's dequantized LoRA-layer weights, in the compute dtype
    block = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    recomputed = "one block recomputed + its gradients"
    kept = estimate(inv, settings(dense_weights_kept=True))[recomputed]
    assert kept - estimate(inv, settings())[recomputed] == 2 * block
    assert estimate(inv, settings(method="lora", dense_weights_kept=True))[recomputed] == \
        estimate(inv, settings(method="lora"))[recomputed]  # 16-bit bases: the weight itself, nothing extra
    from snugtune.planner import _settings
    cfg = tiny_config(tmp_path, alpaca_file, method="qlora")
    assert _settings(cfg, inv, 1, True).dense_weights_kept
    assert not _settings(cfg, inv, 1, False).dense_weights_kept  # blocks not recomputed dequantize again
    assert not _settings(cfg, inv, 1, True, offload=(False, False, True)).dense_weights_kept


def test_peak_holds_only_the_largest_transient(inv):
    parts = estimate(inv, settings())
    transient = max(parts["one block recomputed + its gradients"], parts["logits and loss (chunked)"])
    persistent = sum(v for k, v in parts.items() if k not in ("one block recomputed + its gradients",
                     "logits and loss (chunked)", "allocator overhead and fragmentation", "CUDA context"))
    assert peak_allocated(parts) == persistent + transient
    assert peak(parts) == persistent + transient + parts["allocator overhead and fragmentation"] + parts["CUDA context"]


def test_budget_names_and_sizes():
    assert budget_bytes("t4")[:2] == (int(15 * GIB), False)
    assert budget_bytes("10GiB")[0] == 10 * GIB and budget_bytes("24gb")[0] == 24 * GIB
    with pytest.raises(ConfigError, match="neither a card"):
        budget_bytes("t5")


def test_search_prefers_no_checkpointing_when_it_fits_and_keeps_the_effective_batch(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=4096,
                      train={"micro_batch": 4, "grad_accum": 2, "grad_checkpointing": "auto"})
    roomy = plan_for_budget(cfg.model_copy(update={"max_seq_len": 1024}), 80 * GIB, "h100")
    assert roomy.fits and roomy.settings.grad_checkpointing is False and roomy.settings.micro_batch == 4
    long = plan_for_budget(cfg, 80 * GIB, "h100")  # 4 x 4096 without recomputation would not fit: split
    assert long.fits and long.settings.micro_batch * long.grad_accum == 8
    small = plan_for_budget(cfg, 15 * GIB, "t4")
    assert small.fits and small.peak_bytes <= 0.92 * 15 * GIB
    assert small.settings.micro_batch * small.grad_accum == 8  # effective batch kept
    assert small.settings.grad_checkpointing is True or small.settings.micro_batch < 4
    assert small.changes


def test_layernorm_models_under_quantization_keep_fp32_mlp_tensors():
    from transformers import PhiConfig
    phi = inventory_from_config(PhiConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=1000))
    assert (phi.norms_per_block, phi.layer_norm, phi.gated_mlp, phi.hidden_act) == (1, True, False, "gelu_new")
    targets = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    q4 = activation_bytes_per_token_layer(phi, settings(lora_targets=targets))
    lora16 = activation_bytes_per_token_layer(phi, settings(lora_targets=targets, method="lora"))
    # gelu_new keeps 4 tensors of the 256-wide MLP: fp32 (4 bytes) behind 4-bit layers, 2 bytes otherwise
    assert q4 - lora16 == 4 * 256 * (4 - 2)


def test_partial_checkpointing_sits_between_none_and_all(inv):
    per_layer = activation_bytes_per_token_layer(inv, settings()) * 200
    inputs = 64 * 2 * 200  # one block's input: hidden x 2 bytes x tokens
    one = estimate(inv, settings(checkpointed_layers=1))
    assert one["checkpointed block inputs"] == inputs
    assert one["activations (blocks not checkpointed)"] == per_layer  # the top block keeps everything
    full = estimate(inv, settings())
    assert full["checkpointed block inputs"] == 2 * inputs and "activations (blocks not checkpointed)" not in full
    none = estimate(inv, settings(grad_checkpointing=False))
    assert peak(full) < peak(one) < peak(none)


def test_search_fills_the_card_with_partial_checkpointing(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_accum": 4, "grad_checkpointing": "auto"})
    plan = plan_for_budget(cfg, 15 * GIB, "t4")
    assert plan.fits and plan.settings.grad_checkpointing
    assert 0 < plan.settings.checkpointed_layers < 32 and plan.changes["train.checkpoint_layers"][1] > 0
    # the fewest recomputed blocks that fit: one fewer would not
    fewer = Settings(**{**plan.settings.__dict__, "checkpointed_layers": plan.settings.checkpointed_layers - 1})
    assert peak(estimate(inventory_from_config_for(cfg), fewer)) > 0.92 * 15 * GIB >= plan.peak_bytes


def inventory_from_config_for(cfg):
    from snugtune.planner import model_config_for
    return inventory_from_config(model_config_for(cfg))


def test_plan_for_several_gpus_shards_with_fsdp_only_when_replicas_do_not_fit(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="lora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_checkpointing": "auto"}, offload={"weights": False})
    replicas = plan_for_budget(cfg, 40 * GIB, "a100-40", gpus=2, host_available=64 * GIB)
    assert replicas.fits and replicas.settings.shards == 1 and replicas.changes["train.data_parallel"][1] == "ddp"
    sharded = plan_for_budget(cfg, 16 * GIB, "16 GiB", gpus=2, host_available=64 * GIB)
    assert sharded.fits and sharded.settings.shards == 2 and sharded.changes["train.data_parallel"][1] == "fsdp"
    assert sharded.breakdown["frozen 16-bit weights (1/2 shard)"] < 7 * GIB  # half of the 8B's 13 GiB of blocks
    alone = plan_for_budget(cfg, 16 * GIB, "16 GiB", gpus=1, host_available=64 * GIB)
    assert not alone.fits  # one 16 GiB card cannot hold the bf16 8B without streaming
    result = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(_write(tmp_path, cfg)), "--gpu", "16GiB",
                             "--gpus", "2", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["shards"] == 2


def _write(tmp_path, cfg):
    import yaml
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_plan_cli_json_and_exit_3_with_a_suggestion(tmp_path, alpaca_file):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:llama3-8b\ndata: {{path: {alpaca_file}}}\nmethod: lora\nmax_seq_len: 2048\n")
    ok = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(config), "--gpu", "h100", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert {"peak_bytes", "budget_bytes", "fits", "breakdown", "settings"} <= set(result) and result["fits"]
    assert result["breakdown"]["frozen 16-bit weights"] > 12 * GIB
    # (with the weights streamed from host memory an 8B bf16 model does fit a 3080: forbid that here)
    config.write_text(config.read_text() + "offload: {weights: false}\n")
    too_small = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(config), "--gpu", "rtx3080"],
                               capture_output=True, text=True)
    assert too_small.returncode == 3
    assert "does NOT fit" in too_small.stdout and "method=qlora" in too_small.stdout


def test_an_oom_re_plans_the_micro_batch_and_continues_on_the_same_rows(tmp_path, alpaca_file, monkeypatch):
    reference = tiny_config(tmp_path / "a", alpaca_file, output_dir=str(tmp_path / "ref"),
                            train={"max_steps": 4, "micro_batch": 2, "grad_accum": 2})
    train(reference, show_progress=False)
    real = train_module.accumulate_gradients

    def oom_when_big(model, group, *args):
        if group[0]["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, group, *args)
    monkeypatch.setattr(train_module, "accumulate_gradients", oom_when_big)
    notices = []
    cfg = tiny_config(tmp_path / "b", alpaca_file, output_dir=str(tmp_path / "oom"),
                      train={"max_steps": 4, "micro_batch": 4, "grad_accum": 1})
    summary = train(cfg, show_progress=False, notify=notices.append)
    assert summary["steps"] == 4 and any("re-planned to micro_batch=2 x grad_accum=2" in n for n in notices)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "oom" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert "micro_batch: 2" in (tmp_path / "oom" / "config.yaml").read_text()
