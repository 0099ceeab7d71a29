"""Micro-batches of preference data, laid out for preference_loss.group_logps: each sequence's scored tokens
carry the index of the group whose log-probability they add to (label_groups, laid out as the labels are).

Pairs: the chosen sequences (prompt + chosen answer) of pairs 0..n-1, then the rejected ones, padded to the
longest (TRL's DataCollatorForPreference layout) or each pair's two sequences packed into one row. Groups:
chosen answer i is group i, rejected answer i is n + i, and with prompt_nll (ORPO's NLL over the whole
chosen sequence, as TRL's ORPOTrainer computes it) chosen prompt i is 2n + i.

Labelled completions (KTO): row i (prompt i + completion i) is group i, padded; beside it, under keys
prefixed kl_, the mismatched pairs KTO's reference point is estimated from: prompt i with its row's KL
partner completion (preference_tokenize.kl_partners), also group i.

Each batch also holds `examples` (the pairs or rows it holds) and, where the reference model's
log-probabilities were computed before training, `reference_logps` (chosen then rejected answers; KTO: the
completions, and kl_reference_logps the mismatched ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snugtune.data.batches import collate_micro_batch
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
from snugtune.data.tokenize import IGNORE, TokenizedSample


KL_PREFIX = "kl_"


@dataclass
class PreferenceBatch:
    tensors: dict[str, torch.Tensor]  # input_ids, labels, label_groups, token_mask, examples (+ position_ids,
    groups: int                       # cu_seq_lens; reference_logps; KTO: desirable and the kl_ rows)


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


def _reference(examples: list, position: int) -> torch.Tensor | None:
    """The examples' precomputed reference log-probabilities at `position` of each, when every one has them."""
    if not examples or any(e.reference_logps is None for e in examples):
        return None
    return torch.tensor([e.reference_logps[position] for e in examples], dtype=torch.float32)


def pair_batch(pairs: list[TokenizedPair], pad_id: int, prompt_nll: bool = False, packed: bool = False,
               pad_multiple: int = 1) -> PreferenceBatch:
    """One forward's worth of pairs: chosen and rejected sequences (module docstring)."""
    n = len(pairs)
    chosen = [_sequence(p.prompt_ids, p.chosen_ids, p.chosen_labels, i, 2 * n + i if prompt_nll else None)
              for i, p in enumerate(pairs)]
    rejected = [_sequence(p.prompt_ids, p.rejected_ids, p.rejected_labels, n + i) for i, p in enumerate(pairs)]
    rows = [[c, r] for c, r in zip(chosen, rejected)] if packed else [[s] for s in chosen + rejected]
    batch = _batch(rows, 3 * n if prompt_nll else 2 * n, pad_id, packed, pad_multiple)
    batch.tensors["examples"] = torch.tensor(n)
    if _reference(pairs, 0) is not None:
        batch.tensors["reference_logps"] = torch.cat([_reference(pairs, 0), _reference(pairs, 1)])
    return batch


def labelled_batch(rows: list[TokenizedCompletion], pad_id: int, pad_multiple: int = 1) -> PreferenceBatch:
    """One forward's worth of KTO rows, padded, with their mismatched rows under kl_ keys (module docstring)."""
    n = len(rows)
    matched = _batch([[_sequence(r.prompt_ids, r.completion_ids, r.completion_labels, i)] for i, r in enumerate(rows)],
                     n, pad_id, False, pad_multiple)
    mismatched = _batch([[_sequence(r.prompt_ids, r.kl_ids, r.kl_labels, i)] for i, r in enumerate(rows)],
                        n, pad_id, False, pad_multiple)
    tensors = {**matched.tensors, **{KL_PREFIX + k: v for k, v in mismatched.tensors.items()},
               "desirable": torch.tensor([r.desirable for r in rows], dtype=torch.bool), "examples": torch.tensor(n)}
    for position, key in ((0, "reference_logps"), (1, KL_PREFIX + "reference_logps")):
        if _reference(rows, position) is not None:
            tensors[key] = _reference(rows, position)
    return PreferenceBatch(tensors, n)


def kl_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A KTO batch's mismatched rows as a batch of their own (group_logps reads it)."""
    return {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}
