import pytest

from conftest import alpaca_rows, prepare, write_jsonl
from snugtune.data.batches import (GPU_PAD_MULTIPLE, collate, collate_micro_batch, collate_packed, eval_batches,
                                   micro_batches, real_tokens)
from snugtune.data.tokenize import IGNORE
from snugtune.models.resolve import resolve_model


def test_collate_keeps_padding_out_of_the_loss_and_counts_only_real_tokens(tokenizer, tmp_path):
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4)), 128)
    batch = collate(data.train, tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # right padding: causal attention never looks ahead at it
    for i, sample in enumerate(data.train):
        n = len(sample.input_ids)
        assert (batch["labels"][i, n:] == IGNORE).all()
    assert real_tokens(batch) == sum(len(s.input_ids) for s in data.train)


def test_eval_batches_hold_no_more_tokens_than_a_training_micro_batch(tokenizer, tmp_path):
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12)), 128)
    samples = data.train
    longest = max(len(s.input_ids) for s in samples)
    batches = eval_batches(samples, 4, tokenizer.pad_token_id, max_tokens=2 * longest)
    assert all(b["input_ids"].numel() <= 2 * longest for b in batches)
    rows = [row for b in batches for row in b["input_ids"]]
    assert [row[:len(s.input_ids)].tolist() for row, s in zip(rows, samples)] == [s.input_ids for s in samples]
    assert len(rows) == len(samples)  # every sample once, in the stored order
    assert len(eval_batches(samples, 4, tokenizer.pad_token_id)) == -(-len(samples) // 4)  # no budget: by count
    one_each = eval_batches(samples, 4, tokenizer.pad_token_id, max_tokens=1)  # a sample longer than the budget
    assert [b["input_ids"].shape[0] for b in one_each] == [1] * len(samples)


def test_eos_is_trained_even_though_pad_equals_eos(tmp_path, tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2's setup, the classic trap
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3)))
    batch = collate(data.train, tokenizer.pad_token_id)
    for i, sample in enumerate(data.train):
        answer_eos = [j for j, (t, lab) in enumerate(zip(sample.input_ids, sample.labels))
                      if t == tokenizer.eos_token_id and lab != IGNORE]
        assert len(answer_eos) == 1  # the end of the answer is a target, in the batch too
        assert batch["labels"][i, answer_eos[0]] == tokenizer.eos_token_id


def test_packing_fills_rows_without_crossing_max_seq_len(tmp_path, tokenizer):
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40)))
    packed = micro_batches(data.train, 2, 0, 0, packed_len=256)
    rows = [row for batch in packed for row in batch]
    assert all(sum(len(s.input_ids) for s in row) <= 256 for row in rows)
    assert sorted(id(s) for row in rows for s in row) == sorted(id(s) for s in data.train)  # each sample once
    assert len(rows) < len(data.train) / 3  # really packed


def _tiny_model():
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(resolve_model("shape:tiny").path, dtype=torch.float32).eval()


def test_a_samples_loss_is_the_same_packed_and_alone(tmp_path, tokenizer):
    import torch
    from snugtune.loss import token_loss_sum
    model = _tiny_model()
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(6)), format="alpaca")
    with torch.no_grad():
        alone = [token_loss_sum(model, collate([s], tokenizer.pad_token_id)) for s in data.train]
        packed_sum, packed_n = token_loss_sum(model, collate_packed([data.train], tokenizer.pad_token_id))
        for i, sample in enumerate(data.train):  # each sample's own loss inside the packed row
            others = [s for s in data.train if s is not sample]
            row = collate_packed([[*others, sample]], tokenizer.pad_token_id)
            start = sum(len(s.input_ids) for s in others)
            row["labels"][:, :start] = IGNORE
            inside, n = token_loss_sum(model, row)
            assert n == alone[i][1] and float(inside) == pytest.approx(float(alone[i][0]), rel=1e-5)
    assert packed_n == sum(n for _, n in alone)
    assert float(packed_sum) == pytest.approx(sum(float(l) for l, _ in alone), rel=1e-5)


def test_gpu_rounding_of_lengths_pads_without_changing_tokens_or_loss(tmp_path, tokenizer):
    import torch
    from snugtune.loss import token_loss_sum
    model = _tiny_model()
    data = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(6)), format="alpaca")
    for packed, rows in ((True, [data.train[:3], data.train[3:5]]), (False, [[s] for s in data.train[:3]])):
        exact = collate_micro_batch(rows, tokenizer.pad_token_id, packed)
        rounded = collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE)
        assert exact["input_ids"].shape[1] % GPU_PAD_MULTIPLE != 0  # the rounding does something here
        assert rounded["input_ids"].shape[1] % GPU_PAD_MULTIPLE == 0
        assert real_tokens(rounded) == real_tokens(exact)
        with torch.no_grad():
            (loss, n), (loss_rounded, n_rounded) = token_loss_sum(model, exact), token_loss_sum(model, rounded)
        assert n_rounded == n and float(loss_rounded) == pytest.approx(float(loss), rel=1e-5)
        # never past max_seq_len (what the planner sized the run for), never shorter than the rows
        length = exact["input_ids"].shape[1]
        capped = collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE, max_len=length + 1)
        assert capped["input_ids"].shape[1] == length + 1
        assert collate_micro_batch(rows, tokenizer.pad_token_id, packed, GPU_PAD_MULTIPLE,
                                   max_len=length - 1)["input_ids"].shape[1] == length
    # a packed row of one sample stays one run of positions through its padding: no block-diagonal mask
    single = collate_micro_batch([data.train[:1]], tokenizer.pad_token_id, True, GPU_PAD_MULTIPLE)
    assert torch.equal(single["position_ids"][0], torch.arange(single["input_ids"].shape[1]))
