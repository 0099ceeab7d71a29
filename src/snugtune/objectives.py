"""How each objective trains, as one table (OBJECTIVES): what a row of its data holds, how a micro-batch is
collated, the loss terms a micro-batch adds to and what each is normalised by over the optimizer step, and
the metrics it logs. The engine's step, its held-out evaluation and `snugtune eval` read the table; nothing
else asks which objective runs.

    objective  loss terms a micro-batch adds to            each divided by, over the optimizer step
    sft        token cross-entropy, summed                  the step's trained tokens
    dpo        DPO's per-pair losses, summed                the step's pairs
    orpo       odds-ratio per-pair losses; the NLL, summed  the step's pairs; the NLL's tokens
    kto        KTO's per-row losses, summed                 the step's rows (reference point z: over the step)

So any split of a step's rows into micro-batches (and processes) gives the same gradient. The reference model
(dpo, kto) is, by what the engine built: log-probabilities computed before training and carried in the batch
(reference_logps), a frozen copy of the base (reference_model), or the model with its adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from snugtune.config import PreferenceConfig
from snugtune.data.batches import collate_micro_batch, epoch_rows, eval_batches
from snugtune.data.preference_batches import kl_rows, labelled_batch, pair_batch
from snugtune.data.tokenize import IGNORE
from snugtune.loss import mean_loss, token_loss_sum
from snugtune.preference_loss import dpo_loss, group_logps, kto_loss, metric_means, orpo_loss

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name: (sum, count), added up over micro-batches


def trained_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions the loss scores in a batch (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def add_metrics(into: Metrics | None, metrics: Metrics) -> None:
    """Add a micro-batch's metric sums and counts to the step's."""
    if into is None:
        return
    for name, (total, count) in metrics.items():
        before = into.get(name)
        into[name] = (total, count) if before is None else (before[0] + total, before[1] + count)


@dataclass(frozen=True)
class Objective:
    """One row of OBJECTIVES. Functions take the TrainingObjective (this row and the settings it reads)."""
    name: str
    packs_rows: bool       # rows pack several samples up to max_seq_len; else each holds one example (a pair,
                           # a labelled completion)
    by_length: bool        # an epoch's padded rows are grouped by length (data.batches.epoch_rows), else shuffled
    collate: Callable      # (t, examples of each row, pad_id, packed, pad_multiple, max_len) -> batch
    counts: Callable       # (t, batch) -> one count per loss term, that the step's sums are divided by
    loss_sums: Callable    # (t, model, batch, metrics, fixed_shape) -> the terms (a scalar for one), metrics added
    scored_tokens: Callable  # (t, example) -> tokens whose log-probabilities go through the output head
    held_out: Callable     # (t, model, batches, precision, device) -> (loss, what it is a mean over, metrics)
    step_state: Callable | None = None  # (t, model, micro-batches, device, reduce) -> tensors for every batch


# --- sft ------------------------------------------------------------------------------------------

def _sft_collate(t, rows, pad_id, packed, pad_multiple, max_len):
    return collate_micro_batch(rows, pad_id, packed, pad_multiple, max_len)


def _sft_sums(t, model, batch, metrics, fixed_shape):
    return token_loss_sum(model, batch, fixed_shape=fixed_shape)[0]


def _sft_held_out(t, model, batches, precision, device):
    """The mean token loss (mean_loss: an FSDP root computes it itself)."""
    loss, tokens = mean_loss(model, batches, precision, device)
    return loss, tokens, {}


# --- preference -----------------------------------------------------------------------------------

def _reference_logps(t: "TrainingObjective", model, batch: dict, groups: int,
                     fixed_shape: bool = False) -> torch.Tensor:
    """The reference model's summed log-probabilities of each group: computed before training, from the
    frozen copy, or from the model with its adapter disabled (no gradient either way)."""
    if "reference_logps" in batch:
        return batch["reference_logps"]
    with torch.no_grad():
        if t.reference_model is not None:
            return group_logps(t.reference_model, batch, groups, fixed_shape)[0]
        with model.disable_adapter():
            return group_logps(model, batch, groups, fixed_shape)[0]


def _examples(batch: dict) -> int:
    return int(batch["examples"])  # a host tensor where the step is captured (engine.graphs)


def _pair_collate(t, rows, pad_id, packed, pad_multiple, max_len):
    return pair_batch([row[0] for row in rows], pad_id, False, packed, pad_multiple).tensors


def _orpo_collate(t, rows, pad_id, packed, pad_multiple, max_len):  # the chosen prompts too, with prompt_nll
    return pair_batch([row[0] for row in rows], pad_id, t.preference.prompt_nll, packed, pad_multiple).tensors


def _orpo_scored(t, pair) -> int:
    return pair.trained_tokens + (len(pair.prompt_ids) - 1 if t.preference.prompt_nll else 0)


def _dpo_sums(t, model, batch, metrics, fixed_shape):
    n, p = _examples(batch), t.preference
    # the reference first: its activations are gone before the policy's forward
    ref = _reference_logps(t, model, batch, 2 * n, fixed_shape)
    sums, tokens = group_logps(model, batch, 2 * n, fixed_shape)
    loss = dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], tokens[:n], tokens[n:], p.beta, p.loss_type,
                    p.label_smoothing)
    add_metrics(metrics, loss.metrics)
    return loss.losses.sum()


def _orpo_counts(t, batch):
    """Pairs, and the tokens of the NLL term: the chosen answers' (groups 0..n-1) and, with prompt_nll, the
    chosen prompts' (groups 2n..3n-1)."""
    n = _examples(batch)
    owners = batch["label_groups"][:, 1:]
    nll = (owners >= 0) & (owners < n) | (owners >= 2 * n)
    return n, int(nll.sum())


def _orpo_sums(t, model, batch, metrics, fixed_shape):
    n, p = _examples(batch), t.preference
    sums, tokens = group_logps(model, batch, 3 * n if p.prompt_nll else 2 * n, fixed_shape)
    prompt = (sums[2 * n:], tokens[2 * n:]) if p.prompt_nll else (None, None)
    loss = orpo_loss(sums[:n], sums[n:2 * n], tokens[:n], tokens[n:2 * n], p.beta, *prompt)
    add_metrics(metrics, loss.metrics)
    return torch.stack([loss.losses.sum(), loss.nll_sum])


def _kto_collate(t, rows, pad_id, packed, pad_multiple, max_len):
    return labelled_batch([row[0] for row in rows], pad_id, pad_multiple).tensors  # KTO rows are padded


def _kto_state(t, model, group, device, reduce):
    """KTO's reference point z over the whole step: the mean log-ratio of policy (no gradient) to reference
    on every micro-batch's mismatched rows, at least 0 (TRL estimates it per batch; over the step, the
    micro-batch split does not change it)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in group:
            mismatched = {k: v.to(device, non_blocking=True) for k, v in kl_rows(batch).items()}
            n = _examples(batch)
            ratio = group_logps(model, mismatched, n)[0] - _reference_logps(t, model, mismatched, n)
            total, count = total + float(ratio.sum()), count + n
    total, count = reduce(total), reduce(count)
    return {"kto_reference_point": torch.tensor(max(0.0, total / max(count, 1)), device=device)}


def _kto_sums(t, model, batch, metrics, fixed_shape):
    n, p = _examples(batch), t.preference
    ref = _reference_logps(t, model, batch, n)
    sums, _ = group_logps(model, batch, n)
    loss = kto_loss(sums, ref, batch["desirable"], batch["kto_reference_point"], p.beta, p.desirable_weight,
                    p.undesirable_weight)
    add_metrics(metrics, loss.metrics)
    return loss.losses.sum()


def _one_count(t, batch):
    return (_examples(batch),)


@torch.no_grad()
def _preference_held_out(t, model, batches, precision, device):
    """The step's loss over all held-out batches (each term divided by its count over them), the examples,
    and the metrics' means."""
    sums, counts, metrics = None, None, {}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast():
            batch.update(t.step_state(model, [batch], device))
            part = t.loss_sums(model, batch, metrics).float().reshape(-1)
        sums = part if sums is None else sums + part
        counts = [a + b for a, b in zip(counts or [0] * len(part), t.counts(batch))]
    if sums is None:
        return float("nan"), 0, {}
    return sum(float(total) / max(count, 1) for total, count in zip(sums, counts)), counts[0], metric_means(metrics)


def _scored(t, example) -> int:
    return example.trained_tokens


def sequence_lengths(example) -> list[int]:
    """The tokens of each sequence a preference example lays out: a pair's prompt + chosen and prompt +
    rejected; a KTO row's prompt + completion."""
    if hasattr(example, "chosen_ids"):
        return [len(example.prompt_ids) + len(example.chosen_ids), len(example.prompt_ids) + len(example.rejected_ids)]
    return [len(example.prompt_ids) + len(example.completion_ids)]


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", packs_rows=True, by_length=True,
                     collate=_sft_collate, counts=lambda t, batch: (trained_positions(batch),), loss_sums=_sft_sums,
                     scored_tokens=_scored, held_out=_sft_held_out),
    "dpo": Objective("dpo", packs_rows=False, by_length=True,
                     collate=_pair_collate, counts=_one_count, loss_sums=_dpo_sums, scored_tokens=_scored,
                     held_out=_preference_held_out),
    "orpo": Objective("orpo", packs_rows=False, by_length=True,
                      collate=_orpo_collate, counts=_orpo_counts, loss_sums=_orpo_sums, scored_tokens=_orpo_scored,
                      held_out=_preference_held_out),
    "kto": Objective("kto", packs_rows=False, by_length=False,
                     collate=_kto_collate, counts=_one_count, loss_sums=_kto_sums, scored_tokens=_scored,
                     held_out=_preference_held_out, step_state=_kto_state),
}


@dataclass(frozen=True)
class TrainingObjective:
    """An objective with what its loss reads: the preference settings and, for full and freeze runs whose
    reference is a copy, that frozen copy. What the engine's step and evaluation are given."""
    objective: Objective = OBJECTIVES["sft"]
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    reference_model: torch.nn.Module | None = None

    def epoch_rows(self, examples: list, seed: int, epoch: int, packed_len: int | None) -> list[list]:
        """One epoch's rows in training order (data.batches.epoch_rows, by length where the objective is)."""
        return epoch_rows(examples, seed, epoch, packed_len, self.objective.by_length)

    def collate(self, rows: list, pad_id: int, packed: bool, pad_multiple: int = 1,
                max_len: int | None = None) -> dict[str, torch.Tensor]:
        """A micro-batch of rows (each a list of samples, or of one preference example)."""
        return self.objective.collate(self, rows, pad_id, packed, pad_multiple, max_len)

    def counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(self.objective.counts(self, batch))

    def loss_sums(self, model, batch: dict[str, torch.Tensor], metrics: Metrics | None = None,
                  fixed_shape: bool = False) -> torch.Tensor:
        """The micro-batch's loss terms (a scalar where the objective has one, else [terms]), each a sum to be
        divided by the step's count of it."""
        return self.objective.loss_sums(self, model, batch, metrics, fixed_shape)

    def step_state(self, model, group: list[dict], device: torch.device, reduce=lambda value: value) -> dict:
        """What every micro-batch of the step reads beside its own tensors (KTO: the reference point);
        `reduce` sums a number over processes."""
        if self.objective.step_state is None:
            return {}
        return self.objective.step_state(self, model, group, device, reduce)

    def held_out_batches(self, examples: list, batch_size: int, pad_id: int, pad_multiple: int = 1,
                         max_len: int | None = None, max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Held-out batches of consecutive examples in their stored order (the same every time), at most
        batch_size of them and no more tokens than a training micro-batch of max_tokens (samples: unless
        one alone has more; preference examples: as many as a micro-batch holds)."""
        if self.objective.packs_rows:
            return eval_batches(examples, batch_size, pad_id, pad_multiple, max_len, max_tokens)
        size = max(1, min(batch_size, max_tokens // max_len if max_tokens and max_len else batch_size))
        return [self.collate([[e] for e in examples[k:k + size]], pad_id, False, pad_multiple, max_len)
                for k in range(0, len(examples), size)]

    def lengths_vary(self, rows: list[list], pad_multiple: int) -> bool:
        """Whether the rows' sequences pad to more than one length (micro-batches of several shapes). Packed
        rows are counted as full."""
        if self.objective.packs_rows:
            return False
        lengths = {-(-n // pad_multiple) for row in rows for example in row for n in sequence_lengths(example)}
        return len(lengths) > 1

    def scored_tokens(self, row: list) -> int:
        """Positions of a row whose log-probabilities go through the output head (what the planner sizes
        the loss by)."""
        return sum(self.objective.scored_tokens(self, example) for example in row)


SUPERVISED = TrainingObjective()


def training_objective(config, reference_model: torch.nn.Module | None = None) -> TrainingObjective:
    return TrainingObjective(OBJECTIVES[config.objective], config.preference, reference_model)


def held_out_loss(t: TrainingObjective, model, batches: list[dict], precision,
                  device: torch.device) -> tuple[float, int, dict[str, float]]:
    """(the objective's loss on held-out batches, the tokens or examples it is a mean over, its metrics'
    means), in eval mode (no LoRA dropout). Model left in train mode."""
    was_training = model.training
    model.eval()
    try:
        return t.objective.held_out(t, model, batches, precision, device)
    finally:
        model.train(was_training)
