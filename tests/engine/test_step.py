"""engine/step.py on shape:tiny: every method learns, accumulation is exact, checkpointed LoRA gets gradients."""

import pytest
import torch

from conftest import CPU, FP32, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine.optim import build_optimizer
from snugtune.engine.step import accumulate_gradients


@pytest.mark.parametrize("method", ["lora", "qlora", "lora-8bit", "freeze", "full"])
def test_each_method_lowers_the_loss_on_a_fixed_batch(tmp_path, alpaca_file, method):
    cfg, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, method=method, freeze={"trainable_layers": 1})
    batch = collate(data.train[:8], tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train, CPU)
    scaler = FP32.grad_scaler()
    losses = []
    for _ in range(6):
        losses.append(accumulate_gradients(model, [batch], FP32, scaler, CPU))
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses


def test_accumulation_8x1_equals_1x8_on_ragged_data(tmp_path, alpaca_file):
    cfg, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0})
    samples = data.train[:8]
    assert len({len(s.input_ids) for s in samples}) > 1  # really ragged
    scaler = FP32.grad_scaler()
    one_batch = accumulate_gradients(model, [collate(samples, tokenizer.pad_token_id)], FP32, scaler, CPU)
    together = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    eight = accumulate_gradients(model, [collate([s], tokenizer.pad_token_id) for s in samples], FP32, scaler, CPU)
    apart = trainable_grads(model)
    assert abs(one_batch - eight) < 1e-5
    for name in together:
        assert torch.allclose(together[name], apart[name], atol=1e-5, rtol=1e-4), name


def test_every_lora_b_gets_a_gradient_at_step_one_with_checkpointing(tmp_path, alpaca_file):
    cfg, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, train={"grad_checkpointing": True})
    assert model.get_base_model().model.gradient_checkpointing
    accumulate_gradients(model, [collate(data.train[:4], tokenizer.pad_token_id)], FP32, FP32.grad_scaler(), CPU)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 7  # two blocks x seven projections
    for name, p in lora_b.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("checkpoint_layers", [None, 1, 0])
def test_partial_checkpointing_gives_the_same_gradients(tmp_path, alpaca_file, checkpoint_layers):
    # None: every block recomputes; 1: only the first; 0: none (all keep their activations)
    batch_of = lambda data, tok: collate(data.train[:4], tok.pad_token_id)  # noqa: E731
    _, plain, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                       train={"grad_checkpointing": False})
    accumulate_gradients(plain, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU)
    _, model, _, _ = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                            train={"grad_checkpointing": True, "checkpoint_layers": checkpoint_layers})
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    assert flags == {None: [True, True], 1: [True, False], 0: [False, False]}[checkpoint_layers]
    accumulate_gradients(model, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU)
    expected = trainable_grads(plain)
    for name, grad in trainable_grads(model).items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-5), name
