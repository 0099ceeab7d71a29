"""CPU offload: saved activations and streamed block weights give the same training, with the bookkeeping
(which blocks are resident, in what order they are fetched) a GPU run relies on."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_config
from snugtune.engine.offload import ActivationOffload, WeightStreamer
from snugtune.engine.train import train
from snugtune.planner import plan_for_budget
from snugtune.planner.cards import GIB


def _lora_llama(layers: int = 4):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero, so every LoRA matrix gets a gradient
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    return model


def _step(model, ids, offload=None):
    model.zero_grad(set_to_none=True)
    with offload or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def test_activation_offload_moves_saved_tensors_out_and_gives_the_same_gradients():
    model = _lora_llama()
    expected = _step(model, IDS)
    offload = ActivationOffload(device_types=("cpu",), min_bytes=0)  # on a CPU-only machine: copy to host anyway
    got = _step(model, IDS, offload)
    assert offload.offloaded_bytes >= 4 * 2 * 24 * 32 * 4  # at least every checkpointed block input (fp32)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_weight_streaming_keeps_two_blocks_fetches_in_run_order_and_leaves_weights_bit_identical():
    model = _lora_llama(layers=4)
    expected = _step(model, IDS)
    layers = model.get_base_model().model.layers
    before = {n: p.detach().clone() for n, p in layers.named_parameters() if not p.requires_grad}
    streamer = WeightStreamer(layers, torch.device("cpu")).attach(model)
    assert streamer.resident() == []  # every block's frozen weights start at home
    got = _step(model, IDS)
    # forward brings each block and prefetches the next; the recomputation in backward walks down
    assert streamer.fetch_log == [0, 1, 2, 3, 1, 0]
    assert streamer.max_resident == 2
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    streamer.detach()
    for name, p in layers.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[name]), name
    for home in (h for block in streamer.blocks for h in block.home):
        assert not home.requires_grad


def test_training_with_both_offloads_on_cpu_gives_the_same_qlora_adapter(tmp_path, alpaca_file):
    from safetensors.torch import load_file
    common = {"method": "qlora", "train": {"max_steps": 2, "micro_batch": 4, "lr": 1e-2, "seed": 0,
                                           "grad_checkpointing": True}}
    plain = tiny_config(tmp_path / "a", alpaca_file, **common)
    offloaded = tiny_config(tmp_path / "b", alpaca_file, **common,
                            offload={"activations": True, "weights": True})
    train(plain, show_progress=False)
    train(offloaded, show_progress=False)
    a = load_file(Path(plain.output_dir) / "adapter_model.safetensors")
    b = load_file(Path(offloaded.output_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    losses = [json.loads(line).get("loss") for line in open(Path(offloaded.output_dir) / "metrics.jsonl")]
    assert any(loss is not None for loss in losses)


def test_planner_streams_weights_only_when_nothing_else_fits_and_checks_host_memory(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=2048,
                      train={"micro_batch": 1, "grad_accum": 4, "grad_checkpointing": "auto"})
    roomy = plan_for_budget(cfg, 16 * GIB, "t4", host_available=64 * GIB)
    assert roomy.fits and not roomy.settings.stream_weights and roomy.host_bytes == 0
    small = plan_for_budget(cfg, 6 * GIB, "6 GiB", host_available=64 * GIB)
    assert small.fits and small.settings.stream_weights and small.settings.grad_checkpointing
    assert small.changes["offload.weights"] == ["auto", True]
    assert 3 * GIB < small.host_bytes < 4 * GIB  # the 4-bit block weights of an 8B model, pinned on the host
    starved = plan_for_budget(cfg, 6 * GIB, "6 GiB", host_available=2 * GIB)
    assert not starved.fits and "host memory" in starved.suggestion
    with pytest.raises(ValueError, match="checkpointing"):
        tiny_config(tmp_path, alpaca_file, offload={"weights": True}, train={"grad_checkpointing": False})
