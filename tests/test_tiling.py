"""engine/tiling.py: MLPs over the sequence in checkpointed tiles."""

import pytest
import torch

from conftest import CPU, FP32, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine.step import accumulate_gradients


def test_tiled_mlps_give_the_same_gradients(tmp_path, alpaca_file):
    from snugtune.engine.tiling import tile_mlps
    batch_of = lambda data, tok: collate(data.train[:4], tok.pad_token_id)  # noqa: E731
    grads, losses = [], []
    for tile in (None, 16):  # 16 tokens: every MLP call of the batch runs in several tiles, the last ragged
        # no dropout: tiles draw their masks tile by tile, a different (equally valid) draw
        _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                           train={"grad_checkpointing": True})
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the MLP's LoRA a part in the loss
                torch.nn.init.normal_(p, std=0.1)
        if tile:
            assert tile_mlps(model.get_base_model().model.layers, tile) == 2
        torch.manual_seed(3)
        losses.append(accumulate_gradients(model, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU))
        grads.append(trainable_grads(model))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-5), name
