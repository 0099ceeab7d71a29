"""LoRA dropout from a seeded hash: peft's rate and scaling, the same mask when recomputed, fresh masks per
micro-batch, and gradients unchanged by checkpointing."""

from __future__ import annotations

import pytest
import torch

from snugtune.lora_dropout import CountedDropout, advance_lora_dropout, keep_mask
from snugtune.models.load import load_base_model, prepare_for_training
from snugtune.models.resolve import resolve_model

from conftest import tiny_config


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_counted_dropout_has_torch_dropouts_rate_and_scaling(p):
    x = torch.ones(512, 768)
    seed, key = torch.tensor(7), torch.tensor(3)
    ours = CountedDropout(p, seed, key)(x)
    theirs = torch.nn.Dropout(p)(x)
    n = x.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations
    assert float((ours == 0).float().mean()) == pytest.approx(p, abs=tolerance)
    assert float((theirs == 0).float().mean()) == pytest.approx(p, abs=tolerance)
    assert ours.unique().tolist() == theirs.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert float(ours.mean()) == pytest.approx(1.0, abs=5 * tolerance / (1 - p))


def test_masks_repeat_for_one_seed_and_differ_across_seeds_layers_and_rows():
    seed = torch.tensor(11)
    first = keep_mask(300, 257, seed, torch.tensor(0), 0.5)
    assert torch.equal(first, keep_mask(300, 257, seed.clone(), torch.tensor(0), 0.5))  # a recomputed forward
    others = [keep_mask(300, 257, torch.tensor(12), torch.tensor(0), 0.5),     # the next micro-batch
              keep_mask(300, 257, seed, torch.tensor(1), 0.5),                 # the next layer
              first.roll(1, dims=0), first.roll(1, dims=1)]                    # rows, columns are not copies
    for other in others:  # independent masks agree on half the elements at p = 0.5
        assert float((other == first).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_eval_mode_and_zero_rate_leave_inputs_alone():
    x = torch.randn(4, 8)
    layer = CountedDropout(0.3, torch.tensor(1), torch.tensor(0)).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(CountedDropout(0.0, torch.tensor(1), torch.tensor(0))(x), x)


def _lora_grads(config, checkpointing: bool, advance: int = 0):
    from snugtune.engine.fused_lora import fuse_lora_layers
    from snugtune.loss import token_loss_sum
    torch.manual_seed(1)
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    if not checkpointing:
        model.gradient_checkpointing_disable()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fuse_lora_layers(model)
    model.train()
    for _ in range(advance):
        advance_lora_dropout(model)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123 if checkpointing else 456)  # the global generator plays no part
    loss, _ = token_loss_sum(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_blocks_recompute_the_same_dropout_masks(tmp_path, alpaca_file):
    config = tiny_config(tmp_path, alpaca_file, method="qlora", lora={"dropout": 0.2},
                         train={"grad_checkpointing": True})
    loss, grads = _lora_grads(config, checkpointing=True)
    plain_loss, plain_grads = _lora_grads(config, checkpointing=False)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, g in grads.items():
        assert (g - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name
    later_loss, _ = _lora_grads(config, checkpointing=True, advance=1)
    assert later_loss != pytest.approx(loss, rel=1e-6)  # another micro-batch draws other masks


def test_masks_follow_the_step_not_the_micro_batches_run_before(tmp_path, alpaca_file):
    # a resumed run starts at step N with no history: it must draw what the uninterrupted run drew
    from snugtune.lora_dropout import lora_dropout_seed, start_lora_dropout_step
    config = tiny_config(tmp_path, alpaca_file, lora={"dropout": 0.1})
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    seed = lora_dropout_seed(model)
    drawn = []
    for history in (0, 7):
        for _ in range(history):
            advance_lora_dropout(model)
        start_lora_dropout_step(model, 3)
        advance_lora_dropout(model)
        drawn.append(int(seed))
    start_lora_dropout_step(model, 4)
    advance_lora_dropout(model)
    assert drawn[0] == drawn[1] != int(seed)
