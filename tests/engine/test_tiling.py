"""engine/tiling.py: MLPs over the sequence in checkpointed tiles, attention over groups of heads."""

import pytest
import torch

from conftest import CPU, FP32, cpu_decisions, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine.step import accumulate_gradients


def test_tiled_mlps_give_the_same_gradients(tmp_path, alpaca_file):
    from snugtune.engine.tiling import tile_mlps
    batch_of = lambda data, tok: collate(data.train[:4], tok.pad_token_id)  # noqa: E731
    grads, losses = [], []
    # 100 tokens: every MLP call of the batch runs in several tiles, the last ragged; compiled: the long-context
    # plan compiles its blocks, the tiles' checkpoints inside the compiled recomputation
    for tile, compiled in ((None, False), (100, False), (100, True)):
        # no dropout: tiles draw their masks tile by tile, a different (equally valid) draw
        _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                           train={"grad_checkpointing": True})
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the MLP's LoRA a part in the loss
                torch.nn.init.normal_(p, std=0.1)
        layers = model.get_base_model().model.layers
        if tile:
            assert tile_mlps(layers, tile) == 2
        if compiled:  # dynamo and AOT autograd, where checkpoints meet compilation; Inductor's kernels are
            for layer in layers:  # tested by test_speedups' compiled blocks (a C++ build here costs 30 s)
                layer.compile(backend="aot_eager")
        torch.manual_seed(3)
        losses.append(accumulate_gradients(model, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU))
        grads.append(trainable_grads(model))
    for tiled_loss, tiled_grads in zip(losses[1:], grads[1:]):
        assert tiled_loss == pytest.approx(losses[0], rel=1e-6)
        for name, grad in grads[0].items():
            assert torch.allclose(tiled_grads[name], grad, atol=1e-6, rtol=1e-5), name


def _tiny_with_lora(tmp_path, alpaca_file, **train):
    _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0}, train=train)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the MLP's LoRA a part in the loss
            torch.nn.init.normal_(p, std=0.1)
    return model, collate(data.train[:4], tokenizer.pad_token_id)


def test_the_norm_before_the_mlp_run_inside_its_tiles_gives_the_same_gradients_and_keeps_one_tensor_less(
        tmp_path, alpaca_file):
    from snugtune.engine.lean_norm import lean_norms
    from snugtune.engine.tiling import tile_mlps
    from snugtune.memory_rules import MLP_NORMS
    results = {}
    for inside in (False, True):
        model, batch = _tiny_with_lora(tmp_path, alpaca_file, grad_checkpointing=True)
        lean_norms(model)  # the long-row plan: lean norms, then tiles
        layers = model.get_base_model().model.layers
        assert tile_mlps(layers, 100, norm_name=MLP_NORMS["llama"] if inside else None) == 2
        torch.manual_seed(3)
        loss = accumulate_gradients(model, [batch], FP32, FP32.grad_scaler(), CPU)
        # what the blocks keep for backward when not recomputed: distinct storages saved
        model.gradient_checkpointing_disable()
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        results[inside] = loss, trainable_grads(model), sum(saved.values())
    (loss, grads, kept), (loss_in, grads_in, kept_in) = results[False], results[True]
    assert loss_in == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grads_in[name], grad, atol=1e-6, rtol=1e-5), name
    tokens, hidden = batch["input_ids"].numel(), model.config.hidden_size
    # per block, not kept: the norm's output (fp32 in the tiny model), and what the norm saved besides its input
    # (one fp32 value a row, its weight): the tiles' slices of the input hold what the norm held
    assert kept - kept_in == 2 * (tokens * hidden * 4 + tokens * 4 + hidden * 4)


@pytest.mark.parametrize("packed", [False, True], ids=["padded rows", "packed rows"])
def test_attention_over_head_groups_gives_the_same_gradients(tmp_path, alpaca_file, monkeypatch, packed):
    import snugtune.attention
    from snugtune.data.batches import collate_micro_batch
    from snugtune.engine.tiling import tile_attention

    def batch_of(data, tok):  # packed: rows of several samples, attending per document
        if packed:
            return collate_micro_batch([data.train[0:3], data.train[3:5]], tok.pad_token_id, packed=True)
        return collate(data.train[:4], tok.pad_token_id)
    grads, losses, grouped_calls = [], [], []
    forward = snugtune.attention._HeadGroupedAttention.forward
    monkeypatch.setattr(snugtune.attention._HeadGroupedAttention, "forward",
                        staticmethod(lambda *args: grouped_calls.append(1) or forward(*args)))
    for tiled in (False, True):
        _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                               train={"grad_checkpointing": True})
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if tiled:  # 4 query heads over 2 key/value heads: 2 groups
            assert tile_attention(model.get_base_model().model.layers) == 2
        batch = batch_of(data, tokenizer)
        assert ("cu_seq_lens" in batch) == packed
        torch.manual_seed(3)
        losses.append(accumulate_gradients(model, [batch], FP32, FP32.grad_scaler(), CPU))
        grads.append(trainable_grads(model))
        assert bool(grouped_calls) == tiled
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("compiling", [False, True], ids=["eager blocks", "compiled blocks"])
def test_long_rows_group_attention_and_lean_norms_only_in_eager_blocks(tmp_path, alpaca_file, compiling):
    from snugtune.engine.tiling import tile_for_long_rows
    config, model, _, _ = tiny_model(tmp_path, alpaca_file)
    layers = model.get_base_model().model.layers

    def decisions(tiled: bool):
        train = config.train.model_copy(update={"tiled_mlp": tiled, "compile": compiling})
        return cpu_decisions(config.model_copy(update={"train": train}))
    changed = tile_for_long_rows(model, layers, decisions(tiled=True))
    grouped = 0 if compiling else 2  # compiled blocks cannot trace the grouped backward's recomputation
    assert changed == {"tiled_mlps": 2, "grouped_attention": grouped, "lean_norms": 0 if compiling else 5}
    # eager long rows (lean norms): the norm before each MLP runs inside its tiles
    assert all(("forward" in layer.post_attention_layernorm.__dict__) != compiling for layer in layers)
    assert all(hasattr(layer.self_attn, "snugtune_head_groups") != compiling for layer in layers)
    assert tile_for_long_rows(model, layers, decisions(tiled=False)) == {
        "tiled_mlps": 0, "grouped_attention": 0, "lean_norms": 0}


def test_attention_over_head_groups_in_bf16_autocast_trains_a_full_run_with_the_same_gradients(tmp_path, alpaca_file):
    # a full run's residual stream is fp32: query and key leave rotary in fp32 beside a bf16 value, which autocast
    # alone brings to one dtype; the grouped backward recomputes under it (bf16 is precision: auto on such a CPU)
    from snugtune.engine.tiling import tile_attention
    from snugtune.precision import Precision
    bf16 = Precision("bf16", "cpu")
    losses, grads = [], []
    for tiled in (False, True):
        _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, method="full")
        if tiled:
            assert tile_attention(model.model.layers) == 2
        torch.manual_seed(3)
        losses.append(accumulate_gradients(model, [collate(data.train[:4], tokenizer.pad_token_id)], bf16,
                                           bf16.grad_scaler(), CPU))
        grads.append(trainable_grads(model))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-5), name
