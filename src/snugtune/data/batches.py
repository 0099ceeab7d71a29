"""Turning tokenized samples into micro-batches: padding-free packed rows (default) or pad-to-longest.

Packed: samples are placed first-fit into rows of at most max_seq_len tokens; position ids restart at
each sample, and the model's attention (snugtune.attention, from the samples' start offsets) cannot
cross samples. The first token of
every sample is never a loss target, so a sample's loss is the same packed or alone.
"""

from __future__ import annotations

import random

import torch

from snugtune.data.tokenize import IGNORE, TokenizedSample

Row = list[TokenizedSample]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle of range(n) for one epoch (resume replays the same order)."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def pack_rows(samples: list[TokenizedSample], max_seq_len: int, order: list[int], seed: int) -> list[Row]:
    """First-fit-decreasing packing into rows of at most max_seq_len tokens, rows then shuffled.

    Longest first leaves the short samples to fill the gaps (rows come out nearly full); ties keep the
    epoch's shuffled order, and the final row shuffle mixes long and short rows across micro-batches.
    """
    rows: list[Row] = []
    room: list[int] = []
    for i in sorted(order, key=lambda i: -len(samples[i].input_ids)):
        n = len(samples[i].input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(samples[i])
                room[r] -= n
                break
        else:
            rows.append([samples[i]])
            room.append(max_seq_len - n)
    random.Random(seed).shuffle(rows)
    return rows


LENGTH_WINDOW = 256  # padded mode: samples sorted by length within windows of this many


def epoch_rows(samples: list[TokenizedSample], seed: int, epoch: int, packed_len: int | None = None,
               by_length: bool = True) -> list[Row]:
    """One epoch's rows in training order; a row is one sample, or several packed ones. (Preference examples,
    data.preference_tokenize's, are one a row: packed_len None.)

    The order does not depend on the micro-batch size, so a run can change its micro-batch (after an
    OOM, or on resume) and continue with exactly the same rows. Padded mode (packed_len=None): samples
    sorted by length inside windows of LENGTH_WINDOW so neighbours pad little, window order shuffled; or,
    not by_length, in the shuffled order alone (KTO: sorted by length, its longer answers, often the
    undesirable ones, would fill whole steps).
    """
    order = epoch_order(len(samples), seed, epoch)
    if packed_len is not None:
        return pack_rows(samples, packed_len, order, seed * 31 + epoch)
    if not by_length:
        return [[samples[i]] for i in order]
    windows = [sorted(order[k:k + LENGTH_WINDOW], key=lambda i: -samples[i].length)
               for k in range(0, len(order), LENGTH_WINDOW)]
    random.Random(seed * 7919 + epoch).shuffle(windows)
    return [[samples[i]] for window in windows for i in window]


def micro_batches(samples: list[TokenizedSample], micro_batch: int, seed: int, epoch: int,
                  packed_len: int | None = None) -> list[list[Row]]:
    """One epoch of micro-batches: consecutive groups of `micro_batch` rows of epoch_rows()."""
    rows = epoch_rows(samples, seed, epoch, packed_len)
    return [rows[k:k + micro_batch] for k in range(0, len(rows), micro_batch)]


def _padded_length(longest: int, multiple: int, limit: int | None) -> int:
    """longest rounded up to a multiple, but not past `limit` (max_seq_len: what the planner sized for)."""
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, limit)) if limit else rounded


def collate(samples: list[TokenizedSample], pad_id: int, pad_multiple: int = 1,
            max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sample, rounded up to a multiple of pad_multiple but not past max_len (right
    padding); padded positions are out of the loss. No attention mask: padding comes after every real
    token, so causal attention already keeps it out of their view, and the attention runs on its flash
    kernel with no [L, L] mask (a 28k-token row's dense mask alone is 0.8 GB). token_mask marks the real
    tokens, for counting."""
    longest = _padded_length(max(len(s.input_ids) for s in samples), pad_multiple, max_len)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    real = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        real[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "token_mask": real}


def eval_batches(samples: list[TokenizedSample], batch_size: int, pad_id: int, pad_multiple: int = 1,
                 max_len: int | None = None, max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Padded batches of consecutive samples in their stored order (evaluation: same batches every time):
    at most `batch_size` samples, and at most `max_tokens` padded tokens (a training micro-batch's, so a
    forward without gradients needs less memory than the planned step) unless one sample alone has more."""
    batches, current = [], []
    for sample in samples:
        longest = max([len(s.input_ids) for s in current] + [len(sample.input_ids)])
        tokens = (len(current) + 1) * _padded_length(longest, pad_multiple, max_len)
        if current and (len(current) == batch_size or (max_tokens is not None and tokens > max_tokens)):
            batches.append(collate(current, pad_id, pad_multiple, max_len))
            current = []
        current.append(sample)
    if current:
        batches.append(collate(current, pad_id, pad_multiple, max_len))
    return batches


def collate_packed(rows: list[Row], pad_id: int, pad_multiple: int = 1,
                   max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, labels, position_ids restarting per sample, and token_mask (real tokens,
    for counting only: no attention_mask is given to the model, so it isolates samples by position ids).
    Rows are padded to the longest, rounded up to a multiple of pad_multiple but not past max_len."""
    longest = _padded_length(max(sum(len(s.input_ids) for s in row) for row in rows), pad_multiple, max_len)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    # padding continues the last sample's positions: it comes after every real token, so causal attention
    # keeps it out of their view, and a row holding one sample stays one run (plain causal attention, no
    # block-diagonal mask)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    real = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            ids[r, at:at + n] = torch.tensor(s.input_ids)
            labels[r, at:at + n] = torch.tensor(s.labels)
            labels[r, at] = IGNORE  # no sample predicts the next one's first token
            positions[r, at:at + n] = torch.arange(n)
            real[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(n, n + longest - at)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "token_mask": real}
    if any(len(row) > 1 for row in rows):
        batch["cu_seq_lens"] = document_starts(rows, longest)
    return batch


def document_starts(rows: list[Row], length: int) -> torch.Tensor:
    """int32 offsets of every sample's first token in the rows laid end to end (each row `length` long;
    a row's padding belongs to its last sample), then the total, repeated up to a power of two (at least
    8) so that batches with a few more or fewer samples share one shape."""
    starts = []
    for r, row in enumerate(rows):
        at = r * length
        for sample in row:
            starts.append(at)
            at += len(sample.input_ids)
    size = max(8, 1 << len(starts).bit_length())
    return torch.tensor(starts + [len(rows) * length] * (size - len(starts)), dtype=torch.int32)


# On a GPU every new sequence length costs: cuDNN attention builds a plan per shape, compiled blocks
# specialise on it, and lengths off a multiple of 8 take slower matmul kernels (H100, Llama-3.1-8B
# QLoRA: rows of 2,003-2,047 tokens ran 40% slower than rows of 2,048). Rounding lengths up keeps
# the shapes few and aligned, for at most 63 padded positions a row.
GPU_PAD_MULTIPLE = 64


def collate_micro_batch(rows: list[Row], pad_id: int, packed: bool, pad_multiple: int = 1,
                        max_len: int | None = None) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors: packed rows or padded samples, lengths rounded up to a multiple of
    pad_multiple but not past max_len."""
    if packed:
        return collate_packed(rows, pad_id, pad_multiple, max_len)
    return collate([row[0] for row in rows], pad_id, pad_multiple, max_len)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch (what tokens/s counts)."""
    return int(batch["token_mask"].sum())


def trained_tokens_per_row(rows: list[Row]) -> list[int]:
    """Trained (labelled) positions of each row: what the planner sizes the loss by."""
    return [sum(sample.trained_tokens for sample in row) for row in rows]
