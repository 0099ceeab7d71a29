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
from snugtune.models.load import gradients_reach_blocks
from snugtune.planner.choose import plan_for_budget
from snugtune.planner.cards import GIB
from snugtune.planner.memory import Part


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
    gradients_reach_blocks(model)
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


def test_with_activations_offloaded_no_block_input_stays_on_the_device_through_backward():
    # the embeddings' output used to be a leaf that requires grad (transformers' enable_input_require_grads),
    # which autograd keeps until backward ends: one block input held on the GPU beside the offloaded ones
    import gc
    import weakref
    model = _lora_llama()
    inner = model.get_base_model()
    alive = {}
    inner.model.embed_tokens.register_forward_hook(lambda m, args, out: alive.__setitem__("embeddings", weakref.ref(out)))
    for i, layer in enumerate(inner.model.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: alive.__setitem__(i, weakref.ref(out)))
    expected = _step(model, IDS)
    with ActivationOffload(device_types=("cpu",), min_bytes=0):
        loss = model(input_ids=IDS, labels=IDS).loss
    gc.collect()
    assert [name for name, ref in alive.items() if ref() is not None] == []
    model.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, expected[name]), name


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


def test_offloading_the_activations_of_blocks_not_recomputed_gives_the_same_gradients():
    # the planner's long-row plan (2026-12-07): the first k blocks recomputed, every other block's activations
    # offloaded whole (planner.choose.checkpointing_options)
    from snugtune.models.load import decoder_layers
    plain = _lora_llama()
    plain.gradient_checkpointing_disable()
    expected = _step(plain, IDS)
    partial = _lora_llama()
    for layer in list(decoder_layers(partial))[1:]:
        layer.gradient_checkpointing = False
    offload = ActivationOffload(device_types=("cpu",), min_bytes=0)
    got = _step(partial, IDS, offload)
    everything = ActivationOffload(device_types=("cpu",), min_bytes=0)
    _step(_lora_llama(), IDS, everything)
    assert offload.offloaded_bytes > 2 * everything.offloaded_bytes  # three blocks' activations, not only inputs
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_training_with_every_offload_on_cpu_gives_the_same_qlora_adapter(tmp_path, alpaca_file):
    from safetensors.torch import load_file
    common = {"method": "qlora", "train": {"max_steps": 2, "micro_batch": 4, "lr": 1e-2, "seed": 0,
                                           "grad_checkpointing": True}}
    plain = tiny_config(tmp_path / "a", alpaca_file, **common)
    offloaded = tiny_config(tmp_path / "b", alpaca_file, **common,
                            offload={"activations": True, "weights": True, "embeddings": True})
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
    assert roomy.fits and not roomy.decisions.stream_weights and roomy.host_bytes == 0
    small = plan_for_budget(cfg, 6 * GIB, "6 GiB", host_available=64 * GIB)
    assert small.fits and small.decisions.stream_weights and small.decisions.grad_checkpointing
    assert small.changes["offload.weights"] == ["auto", True]
    assert 3 * GIB < small.host_bytes < 4 * GIB  # the 4-bit block weights of an 8B model, pinned on the host
    starved = plan_for_budget(cfg, 6 * GIB, "6 GiB", host_available=2 * GIB)
    assert not starved.fits and "host memory" in starved.suggestion
    with pytest.raises(ValueError, match="checkpointing"):
        tiny_config(tmp_path, alpaca_file, offload={"weights": True}, train={"grad_checkpointing": False})


def test_embeddings_in_host_memory_train_the_same_steps(tmp_path, alpaca_file):
    losses = {}
    for on_host in (False, True):
        config = tiny_config(tmp_path / str(on_host), alpaca_file, method="qlora", lora={"dropout": 0.0},
                             offload={"embeddings": on_host}, train={"grad_checkpointing": True, "max_steps": 2})
        train(config, show_progress=False)
        rows = [json.loads(line) for line in (tmp_path / str(on_host) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[on_host] = [r["loss"] for r in rows if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_host_embedding_looks_up_rows_on_the_cpu_and_refuses_tied_tables():
    from snugtune.engine.offload import HostEmbedding, keep_embeddings_on_host
    model = _lora_llama(layers=2)
    ids = torch.randint(0, 64, (2, 8))
    before = model(input_ids=ids).logits
    assert keep_embeddings_on_host(model, torch.device("cpu"))
    table = model.get_base_model().get_input_embeddings()
    assert isinstance(table, HostEmbedding) and table.weight.device.type == "cpu"
    assert torch.equal(model(input_ids=ids).logits, before)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert not keep_embeddings_on_host(tied, torch.device("cpu"))


def test_weight_streaming_leaves_a_host_embedding_table_in_host_memory():
    from snugtune.engine.offload import keep_embeddings_on_host, resident_parameters
    model = _lora_llama(layers=2)
    inner = model.get_base_model()
    layers = inner.model.layers
    before = {id(p) for p in resident_parameters(model, layers)}
    assert keep_embeddings_on_host(model, torch.device("cpu"))
    resident = {id(p) for p in resident_parameters(model, layers)}
    assert id(inner.get_input_embeddings().weight) not in resident
    assert {id(inner.lm_head.weight), id(inner.model.norm.weight)} <= resident
    assert len(resident) == len(before) - 1  # the table alone leaves; LoRA matrices and the rest stay
    assert not resident & {id(p) for p in layers.parameters() if not p.requires_grad}


def test_planner_keeps_embeddings_on_host_before_offloading_activations(tmp_path, alpaca_file):
    def plan(gib: int, embeddings="auto"):
        cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=4096,
                          offload={"embeddings": embeddings},
                          train={"micro_batch": 1, "grad_accum": 1, "grad_checkpointing": "auto"})
        return plan_for_budget(cfg, gib * GIB, f"{gib} GiB", host_available=64 * GIB).decisions

    assert not plan(16).embeddings_on_host  # it fits: nothing leaves the GPU
    # 9 GiB: the table alone is enough; forbidden, activations must go to the host instead
    assert plan(9).embeddings_on_host and not plan(9).offload_activations
    assert plan(9, False).offload_activations
    # 7 GiB: table and activations on the host; forbidden, the frozen weights must stream (slowest)
    assert plan(7).embeddings_on_host and plan(7).offload_activations and not plan(7).stream_weights
    assert plan(7, False).stream_weights
    # 6 GiB: streamed weights, and the table stays on the host beside them
    assert plan(6).stream_weights and plan(6).embeddings_on_host
    tight = plan_for_budget(tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora",
                                        max_seq_len=4096, train={"micro_batch": 1, "grad_checkpointing": "auto"}),
                            9 * GIB, "9 GiB", host_available=64 * GIB)
    assert tight.changes["offload.embeddings"] == ["auto", True]
    assert tight.breakdown[Part.HOST_EMBEDDING_TABLE] == 128256 * 4096 * 2  # vocab x hidden
