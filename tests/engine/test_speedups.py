"""The engine's speedups change speed, not numbers: fused LoRA layers and compiled blocks against peft's
own forward and eager blocks, on tiny models on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from snugtune.engine.fused_lora import fuse_lora_layers
from snugtune.engine.train import train
from snugtune.models.load import load_base_model, prepare_for_training
from snugtune.models.resolve import resolve_model

from conftest import cpu_decisions, tiny_config


def _loss_and_lora_grads(config, fuse: bool, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1)
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 dtype), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the low-rank path count
            torch.nn.init.normal_(p, std=0.1)
    fused = fuse_lora_layers(model) if fuse else 0
    model.train()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)  # same dropout masks on both paths
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return fused, float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,dropout,dtype", [("qlora", 0.0, torch.float32), ("qlora", 0.1, torch.float32),
                                                  ("lora", 0.1, torch.float32), ("qlora", 0.0, torch.float16)])
def test_fused_lora_layers_give_peft_loss_and_lora_gradients(tmp_path, alpaca_file, method, dropout, dtype):
    # fp16 is the T4's path: the 4-bit weights dequantize to fp16 and the LoRA matmuls run in fp16
    config = tiny_config(tmp_path, alpaca_file, method=method, lora={"dropout": dropout},
                         train={"grad_checkpointing": True})
    _, loss, grads = _loss_and_lora_grads(config, fuse=False, dtype=dtype)
    fused, fused_loss, fused_grads = _loss_and_lora_grads(config, fuse=True, dtype=dtype)
    assert fused == 7 * 2  # every linear of both blocks of shape:tiny
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert fused_loss == pytest.approx(loss, rel=rtol / 100)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        assert fused_grads[name].dtype == torch.float32  # the LoRA masters' own dtype
        error = (fused_grads[name] - grads[name]).norm() / grads[name].norm()
        assert error < rtol, (name, float(error))


def test_fused_layers_follow_peft_disable_adapter_and_leave_8bit_bases_alone(tmp_path, alpaca_file):
    config = tiny_config(tmp_path, alpaca_file, method="qlora")
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fuse_lora_layers(model)
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert not torch.allclose(adapted, base)
        assert torch.allclose(model.get_base_model()(input_ids=ids).logits, adapted)
    eight = tiny_config(tmp_path, alpaca_file, method="lora-8bit")
    model = prepare_for_training(load_base_model(resolve_model(eight.model).path, eight, torch.device("cpu"),
                                                 torch.float32), eight)
    assert fuse_lora_layers(model) == 0  # LLM.int8 keeps bitsandbytes' own matmul


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dense_copies_give_the_dequantizing_loss_and_gradients_without_dequantizing(tmp_path, alpaca_file,
                                                                                     monkeypatch, dropout):
    # LoRA on the attention only: the MLP's 4-bit layers are not wrapped, and multiply by their copies too
    import bitsandbytes.functional as bnbf
    from snugtune.engine.dense_copy import four_bit_linears
    from snugtune.engine.speedups import apply_speedups
    from snugtune.models.load import decoder_layers
    results = []
    for copy in (False, True):
        config = tiny_config(tmp_path, alpaca_file, method="qlora", quant={"dense_copy": copy},
                             lora={"dropout": dropout, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                             train={"grad_checkpointing": True, "compile": False})
        torch.manual_seed(1)
        model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                     torch.float32), config)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        applied = apply_speedups(model, decoder_layers(model), cpu_decisions(config), torch.float32)
        assert applied.fused_lora_layers == 4 * 2
        four_bit = four_bit_linears(decoder_layers(model))
        assert len(four_bit) == 7 * 2
        assert applied.dense_copy_bytes == (4 * sum(m.weight.quant_state.shape.numel() for m in four_bit) if copy else 0)
        calls = []
        monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, _real=bnbf.dequantize_4bit, **k:
                            calls.append(1) or _real(*a, **k))
        model.train()
        ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(2))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        monkeypatch.undo()
        results.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        len(calls)))
    (loss, grads, dequantized), (copy_loss, copy_grads, copy_dequantized) = results
    assert dequantized > 0 and copy_dequantized == 0
    assert copy_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert (copy_grads[name] - g).norm() <= 1e-5 * g.norm(), name


@pytest.mark.slow
def test_compiled_blocks_train_the_same_steps_as_eager_blocks(tmp_path, alpaca_file):
    losses = {}
    for compiled in (False, True):
        # with LoRA dropout: the compiled backward redraws the same masks (lora_dropout); aot_eager traces the
        # blocks and their backward as inductor does without gcc's minutes (inductor's own code: the test below)
        config = tiny_config(tmp_path / str(compiled), alpaca_file, method="qlora", lora={"dropout": 0.1},
                             train={"compile": compiled, "compile_backend": "aot_eager", "grad_checkpointing": True,
                                    "max_steps": 3})
        summary = train(config, show_progress=False)
        assert summary["speedups"]["compiled_blocks"] == (2 if compiled else 0)
        assert summary["speedups"]["fused_lora_layers"] == 14
        rows = [json.loads(line) for line in (tmp_path / str(compiled) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_train_with_tiled_mlps_logs_the_same_losses(tmp_path, alpaca_file, monkeypatch):
    from snugtune.engine import tiling
    monkeypatch.setattr(tiling, "MLP_TILE_TOKENS", 32)  # rows of up to 96 tokens: several tiles each
    losses = {}
    for tiled in (False, True):
        config = tiny_config(tmp_path / str(tiled), alpaca_file, lora={"dropout": 0.0},
                             train={"tiled_mlp": tiled, "grad_checkpointing": True, "max_steps": 2})
        train(config, show_progress=False)
        rows = [json.loads(line) for line in (tmp_path / str(tiled) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[tiled] = [r["loss"] for r in rows if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_fixed_shape_loss_gives_the_same_loss_and_gradients(tmp_path, alpaca_file):
    # what a CUDA graph runs: every position through the head, untrained ones weighted zero, no sync
    from snugtune.data.batches import collate
    from snugtune.data.prepare import prepare_data
    from snugtune.loss import token_loss_sum
    from snugtune.models.load import load_tokenizer
    config = tiny_config(tmp_path, alpaca_file, method="qlora", lora={"dropout": 0.0})
    path = resolve_model(config.model).path
    tokenizer = load_tokenizer(path)
    rows = prepare_data(config.data, tokenizer, config.max_seq_len, 0).train[:4]
    batch = collate(rows, tokenizer.pad_token_id)  # padded rows: untrained prompt and padding positions
    model = prepare_for_training(load_base_model(path, config, torch.device("cpu"), torch.float32), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    looked_up = {k: v for k, v in batch.items() if k != "input_ids"}  # the host-embeddings way into a graph
    looked_up["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    results = []
    for fixed, inputs in ((False, batch), (True, batch), (True, looked_up)):
        model.zero_grad(set_to_none=True)
        loss, n = token_loss_sum(model, inputs, fixed_shape=fixed)
        loss.backward()
        results.append((float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                                  if p.requires_grad}))
    (loss, n, grads) = results[0]
    assert n > 0
    for fixed_loss, fixed_n, fixed_grads in results[1:]:
        assert fixed_n == -1  # the count comes from the CPU in that mode
        assert fixed_loss == pytest.approx(loss, rel=1e-5)
        for name, g in grads.items():
            assert (fixed_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


@pytest.mark.parametrize("change,wanted", [({}, True), ({"lora": {"dropout": 0.05}}, True),
                                           ({"method": "full"}, False), ({"offload": {"activations": True}}, False),
                                           ({"method": "lora-8bit"}, False),  # LLM.int8 waits on the GPU
                                           ({"offload": {"embeddings": True}}, True),
                                           ({"train": {"compile": False}}, False),
                                           ({"train": {"compile": False, "cuda_graphs": True}}, True)])
def test_cuda_graphs_only_where_a_step_has_fixed_work_and_no_random_numbers(tmp_path, alpaca_file, change, wanted):
    from snugtune.planner.choose import decisions_for
    from snugtune.planner.inventory import inventory_for
    from snugtune.planner.plan import Offload
    sections = {"method": "qlora", "lora": {"dropout": 0.0}, "train": {"grad_checkpointing": True}}
    for key, value in change.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    config = tiny_config(tmp_path, alpaca_file, **sections)
    offload = Offload(*(getattr(config.offload, name) is True for name in Offload._fields))

    def graphs(**where) -> bool:
        return decisions_for(config, inventory_for(config), 4, True, offload=offload, **where).cuda_graphs
    assert graphs() is wanted  # on a CUDA GPU, one process
    assert not graphs(cuda=False) and not graphs(gpus=2)


@pytest.mark.parametrize("host_embeddings,dropout", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_graph_path_adds_the_same_gradients_as_the_eager_step(tmp_path, alpaca_file, host_embeddings, dropout):
    # engine.graphs' own forward/backward (what it warms up, then captures on a GPU) against the training
    # loop's eager one, on the same micro-batches: loss weight, accumulation and host-side lookups included
    from snugtune.data.batches import collate
    from snugtune.data.prepare import prepare_data
    from snugtune.engine.graphs import StepGraphs
    from snugtune.engine.offload import keep_embeddings_on_host
    from snugtune.precision import Precision
    from snugtune.engine.step import accumulate_gradients
    from snugtune.models.load import load_tokenizer
    config = tiny_config(tmp_path, alpaca_file, method="qlora", lora={"dropout": dropout},
                         train={"grad_checkpointing": True})
    path = resolve_model(config.model).path
    tokenizer = load_tokenizer(path)
    rows = prepare_data(config.data, tokenizer, config.max_seq_len, 0).train
    group = [collate(rows[i:i + 3], tokenizer.pad_token_id) for i in (0, 3)]
    grads, losses = [], []
    for use_graphs in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(path, config, torch.device("cpu"), torch.float32), config)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if host_embeddings:  # shape:tiny ties its head to the table: give the head its own copy first
            head = model.get_base_model().get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            assert keep_embeddings_on_host(model, torch.device("cpu"))
        fuse_lora_layers(model)  # as on a GPU, where graphs replay the fused layers
        fp32 = Precision("fp32", "cpu")
        scaler = fp32.grad_scaler()
        graphs = StepGraphs(model, torch.device("cpu"), fp32, scaler) if use_graphs else None
        losses.append(accumulate_gradients(model, group, fp32, scaler, torch.device("cpu"), graphs=graphs))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, g in grads[0].items():
        assert (grads[1][name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_an_oom_while_capturing_a_graph_falls_back_to_eager_without_losing_the_micro_batch(tmp_path, alpaca_file,
                                                                                            monkeypatch):
    from snugtune.data.batches import collate
    from snugtune.data.prepare import prepare_data
    from snugtune.engine.graphs import StepGraphs
    from snugtune.precision import Precision
    from snugtune.models.load import load_tokenizer
    config = tiny_config(tmp_path, alpaca_file, method="qlora", lora={"dropout": 0.0})
    path = resolve_model(config.model).path
    tokenizer = load_tokenizer(path)
    batch = collate(prepare_data(config.data, tokenizer, config.max_seq_len, 0).train[:3], tokenizer.pad_token_id)
    fp32 = Precision("fp32", "cpu")
    grads = []
    for capturing in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(load_base_model(path, config, torch.device("cpu"), torch.float32), config)
        graphs = StepGraphs(model, torch.device("cpu"), fp32, fp32.grad_scaler(), warmup_runs=0)
        if capturing:  # as on a GPU, the first run of a shape past its warm-ups is captured: and runs out
            graphs.captures = True

            def out_of_memory(static):
                raise torch.OutOfMemoryError("CUDA out of memory while capturing (injected)")
            monkeypatch.setattr(graphs, "_capture", out_of_memory)
        loss = graphs.forward_backward(batch, 1.0)
        grads.append((float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        if capturing:
            assert graphs.failure.startswith("OutOfMemoryError") and not graphs.graphs
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    for name, g in grads[0][1].items():
        assert torch.allclose(grads[1][1][name], g, atol=1e-7), name


def test_a_compiled_fused_layer_adds_the_low_rank_product_in_place(tmp_path, alpaca_file):
    # inductor rewrites a traced addmm_ into addmm that first copies the base product into a new buffer
    from torch._inductor.utils import run_and_get_code
    config = tiny_config(tmp_path, alpaca_file, method="lora")
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    fuse_lora_layers(model)
    x = torch.randn(2, 12, layer.in_features)

    def loss_and_grads(step):
        lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        inputs = x.clone().requires_grad_()
        step(inputs)
        grads = [inputs.grad] + [p.grad.clone() for p in lora]
        for p in lora:
            p.grad = None
        return grads

    def step(inputs):
        layer(inputs).square().sum().backward()

    eager = loss_and_grads(step)
    compiled, code = run_and_get_code(loss_and_grads, torch.compile(step))
    source = "\n".join(code)
    assert source.count("torch.ops.snugtune.add_product_") == 2  # forward's output, backward's input gradient
    assert "extern_kernels.addmm" not in source
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
