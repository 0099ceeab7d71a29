"""engine/optim.py: the learning-rate schedule and the flat LoRA optimizer tensor."""

import pytest
import torch

from conftest import CPU, FP32, tiny_model
from snugtune.data.batches import collate
from snugtune.engine.optim import build_optimizer, flatten_trainable, lr_factor
from snugtune.engine.step import accumulate_gradients


def test_one_flat_optimizer_tensor_trains_exactly_like_one_tensor_per_matrix(tmp_path, alpaca_file):
    batch_of = lambda data, tok, k: collate(data.train[4 * k:4 * k + 4], tok.pad_token_id)  # noqa: E731
    weights = {}
    for flat in (False, True):
        cfg, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0}, train={"optimizer": "adamw"})
        params = [p for p in model.parameters() if p.requires_grad]
        stepped = [flatten_trainable(params)] if flat else params
        optimizer = build_optimizer(stepped, cfg.train, CPU)
        for k in range(3):
            accumulate_gradients(model, [batch_of(data, tokenizer, k)], FP32, FP32.grad_scaler(), CPU)
            torch.nn.utils.clip_grad_norm_(stepped, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in params)  # zeroed in place, views kept
        weights[flat] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert weights[True].keys() == weights[False].keys()
    assert all(value.any() for name, value in weights[True].items() if "lora_B" in name)  # B left zero: it trained
    for name, value in weights[False].items():
        assert torch.allclose(weights[True][name], value, atol=1e-6, rtol=1e-5), name


def test_warmup_then_cosine_schedule():
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05
    assert [lr_factor(s, 10, 0, "constant") for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
