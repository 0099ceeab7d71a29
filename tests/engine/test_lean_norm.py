"""engine/lean_norm.py: RMSNorm that keeps its 16-bit input for backward, not an fp32 copy."""

import importlib

import pytest
import torch

from conftest import CPU, FP32, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine import lean_norm
from snugtune.engine.lean_norm import lean_norms
from snugtune.engine.step import accumulate_gradients
from snugtune.memory_rules import LEAN_NORMS


def _norm_class(model_type: str):
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, LEAN_NORMS[model_type])


def _saved_bytes(function, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps from function(x) for backward (besides x itself)."""
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(x)
    return sum(storages.values())


@pytest.mark.parametrize("model_type", sorted(LEAN_NORMS))
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_a_lean_norm_matches_its_transformers_class(monkeypatch, model_type, weight_dtype):
    monkeypatch.setattr(lean_norm, "ROWS_AT_ONCE", 7)  # several slices, the last ragged
    torch.manual_seed(0)
    reference = _norm_class(model_type)(48, eps=1e-5).to(weight_dtype)
    torch.nn.init.normal_(reference.weight, mean=1.0, std=0.2)
    reference.weight.requires_grad_(True)
    x = (torch.randn(2, 25, 48) * 3).to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(2, 25, 48)

    expected = reference(x)
    expected_x, expected_w = torch.autograd.grad(expected, (x, reference.weight), grad_out.to(expected.dtype))
    leaned = lean_norm._lean_forward(reference)(x)
    got_x, got_w = torch.autograd.grad(leaned, (x, reference.weight), grad_out.to(leaned.dtype))

    assert leaned.dtype == expected.dtype
    assert torch.equal(leaned, expected)  # the same expression row by row: bit-identical
    assert torch.allclose(got_x.float(), expected_x.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(got_w.float(), expected_w.float(), rtol=2e-2, atol=5e-2)


def test_a_lean_norm_keeps_its_16_bit_input_and_one_value_a_row():
    norm = _norm_class("llama")(256, eps=1e-5).to(torch.bfloat16)
    x = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    fp32_copy = x.numel() * 4
    assert _saved_bytes(norm, x) >= fp32_copy  # transformers' norm keeps an fp32 copy of its input
    leaned = _saved_bytes(lean_norm._lean_forward(norm), x)
    assert leaned <= 512 * 4 + norm.weight.numel() * 2  # beside x: 1/rms per row and the weight


def test_lean_norms_leave_a_models_loss_and_lora_gradients(tmp_path, alpaca_file):
    losses, grads = [], []
    for lean in (False, True):
        _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                               train={"grad_checkpointing": True})
        if lean:  # two norms a block and the final norm
            assert lean_norms(model) == 2 * len(model.get_base_model().model.layers) + 1
        torch.manual_seed(3)
        batch = collate(data.train[:4], tokenizer.pad_token_id)
        losses.append(accumulate_gradients(model, [batch], FP32, FP32.grad_scaler(), CPU))
        grads.append(trainable_grads(model))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-4), name
