"""Micro-batches of preference data, laid out for preference_loss.group_logps: each sequence's scored tokens
carry the index of the group whose log-probability they add to (label_groups, laid out as the labels are).

Pairs: the chosen sequences (prompt + chosen answer) of pairs 0..n-1, then the rejected ones, padded to the
longest (TRL's DataCollatorForPreference layout) or each pair's two sequences packed into one row. Groups:
chosen answer i is group i, rejected answer i is n + i, and with prompt_nll (ORPO's NLL over the whole
chosen sequence, as TRL's ORPOTrainer computes it) chosen prompt i is 2n + i.

Labelled completions (KTO): row i (prompt i + completion i) is group i; beside it, the KL batch of mismatched
pairs that KTO's reference point is estimated from: prompt i with the completion of row i - 1 (the last
row's for the first), as TRL's KTOTrainer rotates completions within a batch, cut to max_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.data.batches import collate_micro_batch
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
from snugtune.data.tokenize import IGNORE, TokenizedSample


@dataclass
class PreferenceBatch:
    tensors: dict[str, torch.Tensor]  # input_ids, labels, label_groups, token_mask (+ position_ids, cu_seq_lens)
    groups: int


def _sequence(prompt_ids: list[int], answer_ids: list[int], answer_labels: list[int], group: int,
              prompt_group: int | None = None) -> tuple[TokenizedSample, TokenizedSample]:
    """(the sequence with its labels, the same sequence with each label's group in place of the label)."""
    labels = [IGNORE] * len(prompt_ids) + answer_labels
    if prompt_group is not None:  # every prompt token but the first (nothing predicts it)
        labels[1:len(prompt_ids)] = prompt_ids[1:]
    owners = [IGNORE if label == IGNORE else group if at >= len(prompt_ids) else prompt_group
              for at, label in enumerate(labels)]
    return TokenizedSample(prompt_ids + answer_ids, labels), TokenizedSample(prompt_ids + answer_ids, owners)


def _batch(rows: list[list[tuple[TokenizedSample, TokenizedSample]]], groups: int, pad_id: int, packed: bool,
           pad_multiple: int) -> PreferenceBatch:
    # the group ids go through the same collate as the labels, so they land on the same positions
    tensors = collate_micro_batch([[s for s, _ in row] for row in rows], pad_id, packed, pad_multiple)
    owners = collate_micro_batch([[o for _, o in row] for row in rows], pad_id, packed, pad_multiple)
    return PreferenceBatch({**tensors, "label_groups": owners["labels"]}, groups)


def pair_batch(pairs: list[TokenizedPair], pad_id: int, prompt_nll: bool = False, packed: bool = False,
               pad_multiple: int = 1) -> PreferenceBatch:
    """One forward's worth of pairs: chosen and rejected sequences (module docstring)."""
    n = len(pairs)
    chosen = [_sequence(p.prompt_ids, p.chosen_ids, p.chosen_labels, i, 2 * n + i if prompt_nll else None)
              for i, p in enumerate(pairs)]
    rejected = [_sequence(p.prompt_ids, p.rejected_ids, p.rejected_labels, n + i) for i, p in enumerate(pairs)]
    rows = [[c, r] for c, r in zip(chosen, rejected)] if packed else [[s] for s in chosen + rejected]
    return _batch(rows, 3 * n if prompt_nll else 2 * n, pad_id, packed, pad_multiple)


def labelled_batches(rows: list[TokenizedCompletion], pad_id: int, max_len: int, pad_multiple: int = 1
                     ) -> tuple[PreferenceBatch, PreferenceBatch, torch.Tensor]:
    """(the rows, the KL rows of mismatched prompt and completion, desirable [rows] bool), padded."""
    n = len(rows)
    matched = [[_sequence(r.prompt_ids, r.completion_ids, r.completion_labels, i)] for i, r in enumerate(rows)]
    mismatched = []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        room = max(max_len - len(row.prompt_ids), 0)  # TRL cuts the KL sequences to max_length too
        mismatched.append([_sequence(row.prompt_ids, other.completion_ids[:room], other.completion_labels[:room], i)])
    desirable = torch.tensor([r.desirable for r in rows], dtype=torch.bool)
    return (_batch(matched, n, pad_id, False, pad_multiple), _batch(mismatched, n, pad_id, False, pad_multiple),
            desirable)
