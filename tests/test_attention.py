"""Packed rows attend per document without a dense mask from transformers: the same loss as each sample in a
row of its own, and the model's own SDPA wherever a batch carries a padding mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from snugtune.data.batches import collate, collate_micro_batch
from snugtune.data.prepare import prepare_data
from snugtune.attention import ATTENTION, attention, document_mask, head_groups
from snugtune.loss import token_loss_sum
from snugtune.models.load import load_base_model, load_tokenizer, prepare_for_training
from snugtune.models.resolve import resolve_model

from conftest import tiny_config


def test_document_mask_is_causal_within_each_document_only():
    cu = torch.tensor([0, 3, 5, 8, 10, 10, 10, 10], dtype=torch.int32)  # rows of 5: [0-2 | 3-4], [5-7 | 8-9]
    mask = document_mask(cu, 2, 5)[:, 0]
    document = [[0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]
    for b in range(2):
        for q in range(5):
            for k in range(5):
                assert bool(mask[b, q, k]) == (k <= q and document[b][q] == document[b][k]), (b, q, k)


@pytest.fixture
def tiny_lora(tmp_path, alpaca_file):
    config = tiny_config(tmp_path, alpaca_file, method="lora", lora={"dropout": 0.0})
    path = resolve_model(config.model).path
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(path, config, torch.device("cpu"), torch.float32), config)
    tokenizer = load_tokenizer(path)
    samples = prepare_data(config.data, tokenizer, config.max_seq_len, 0).train
    return model, tokenizer, samples


def test_packed_rows_give_the_loss_and_gradients_of_separate_rows(tiny_lora):
    model, tokenizer, samples = tiny_lora
    assert model.config._attn_implementation == ATTENTION
    rows = [samples[0:3], samples[3:5]]
    packed = collate_micro_batch(rows, tokenizer.pad_token_id, packed=True, pad_multiple=16)
    a, b, d = (len(samples[i].input_ids) for i in (0, 1, 3))
    length = packed["input_ids"].shape[1]
    assert packed["cu_seq_lens"].tolist() == [0, a, a + b, length, length + d] + [2 * length] * 3
    packed_loss, packed_count = token_loss_sum(model, packed)
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    total, count = 0.0, 0
    for sample in samples[0:5]:
        one = collate_micro_batch([[sample]], tokenizer.pad_token_id, packed=True)
        assert "cu_seq_lens" not in one  # one document a row: plain causal attention
        loss, n = token_loss_sum(model, one)
        loss.backward()
        total, count = total + float(loss.detach()), count + n
    # packing never trains a row's first token: separate rows score the same positions
    assert packed_count == count
    assert float(packed_loss.detach()) == pytest.approx(total, rel=1e-5)
    for packed_grad, p in zip(packed_grads, (p for p in model.parameters() if p.requires_grad)):
        assert (packed_grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-8


def test_right_padded_batches_without_a_mask_score_as_masked_attention_does(tiny_lora):
    model, tokenizer, samples = tiny_lora
    padded = collate(samples[0:4], tokenizer.pad_token_id, pad_multiple=32)
    loss, n = token_loss_sum(model, padded)
    model.set_attn_implementation("sdpa")
    masked = {**padded, "attention_mask": padded["token_mask"]}  # what a padding-masked collator gives
    reference, m = token_loss_sum(model, masked)
    assert n == m and float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)


def test_rows_of_one_document_take_causal_sdpa_without_a_mask_while_a_graph_is_captured(tiny_lora, monkeypatch):
    # transformers builds a dense causal mask whenever it cannot look at the data (CUDA graph capture); the
    # captured step must run the same attention as its eager warm-up, or capture fails
    import transformers.masking_utils
    model, tokenizer, samples = tiny_lora
    row = collate_micro_batch([[samples[0]]], tokenizer.pad_token_id, packed=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    eager, _ = token_loss_sum(model, row)
    monkeypatch.setattr(transformers.masking_utils, "is_tracing", lambda *args: True)
    captured, _ = token_loss_sum(model, row)
    assert calls and all(mask is None and causal for mask, causal in calls)
    assert float(captured.detach()) == float(eager.detach())


def test_head_groups_keep_the_query_heads_that_share_a_key_head_together():
    assert head_groups(32, 8, 8) == [(slice(4 * g, 4 * g + 4), slice(g, g + 1)) for g in range(8)]
    assert head_groups(32, 8, 3) == [(slice(0, 32), slice(0, 8))]  # gcd 1: one group, the plain path
    assert head_groups(4, 2, 8) == [(slice(0, 2), slice(0, 1)), (slice(2, 4), slice(1, 2))]


@pytest.mark.parametrize("packed", [False, True], ids=["one document a row", "packed rows"])
def test_attention_over_groups_of_heads_gives_sdpa_output_and_gradients(packed, monkeypatch):
    import snugtune.attention
    forward, grouped_calls = snugtune.attention._HeadGroupedAttention.forward, []
    monkeypatch.setattr(snugtune.attention._HeadGroupedAttention, "forward",
                        staticmethod(lambda *args: grouped_calls.append(1) or forward(*args)))
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, heads, 24, 16, dtype=torch.float64, requires_grad=True)
                         for heads in (4, 2, 2))
    upstream = torch.randn(2, 24, 4, 16, dtype=torch.float64)
    # rows of 24: [0-9 | 10-23] and [24-40 | 41-47]
    cu = torch.tensor([0, 10, 24, 41, 48], dtype=torch.int32) if packed else None
    mask = document_mask(cu, 2, 24) if packed else None
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=not packed, scale=0.3, enable_gqa=True).transpose(1, 2)
    expected = torch.autograd.grad(reference, (query, key, value), upstream)
    # an attention module of 4 heads over 2 key/value heads, tiled by engine.tiling.tile_attention
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, snugtune_head_groups=8)
    grouped, _ = attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    assert grouped_calls
    got = torch.autograd.grad(grouped, (query, key, value), upstream)
    assert torch.allclose(grouped, reference, atol=1e-12)
    for mine, theirs in zip(got, expected):
        assert torch.allclose(mine, theirs, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True], ids=["one document a row", "packed rows"])
def test_sm75_kernels_keep_flash_and_cudnn_off_and_give_the_same_attention(packed, monkeypatch):
    # train.attention_kernels: sm75 (bench --emulate t4) must run a T4's kernels on any GPU: SDPA called with only
    # the memory-efficient and math backends enabled, packed rows through the dense document mask
    from snugtune.attention import varlen_usable
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), kwargs.get("attn_mask") is not None))
        return sdpa(*args, **kwargs)
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, heads, 24, 16, dtype=torch.float64) for heads in (4, 2, 2))
    cu = torch.tensor([0, 10, 24, 41, 48], dtype=torch.int32) if packed else None
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    everything, _ = attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    restricted, _ = attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu, kernels="sm75")
    assert seen == [(False, False, True, packed)]
    assert torch.allclose(restricted, everything, atol=1e-12)
    assert torch.backends.cuda.flash_sdp_enabled()  # only inside the call
    assert not varlen_usable(torch.device("cpu"), "sm75") and not varlen_usable(torch.device("cpu"))


def test_sm75_kernels_make_the_planner_count_the_dense_mask_of_packed_rows(tmp_path, alpaca_file):
    from snugtune.planner.choose import plan_config
    for kernels, masked in (("auto", False), ("sm75", True)):
        config = tiny_config(tmp_path, alpaca_file, budget="h100", train={"attention_kernels": kernels})
        assert plan_config(config).decisions.attention_mask is masked
