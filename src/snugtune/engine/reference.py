"""The reference model of a preference objective (dpo, kto) for methods without an adapter to disable (full,
freeze), as the plan says (memory_rules.reference_for): a frozen 16-bit copy of the base, or every example's
reference log-probabilities computed once before training, by the model as built (the base: a resumed run
loads its checkpoint afterwards), and kept in the run folder for the invocations that resume it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from snugtune.data.preference_batches import kl_rows
from snugtune.errors import UserError
from snugtune.models.load import load_base_model
from snugtune.objectives import TrainingObjective
from snugtune.preference_loss import group_logps
from snugtune.rundir import REFERENCE_LOGPS, write_json_atomic

PRECOMPUTE_BATCH = 4  # examples per forward while precomputing


def frozen_copy(base_path: Path, config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base loaded again, 16-bit and frozen, in eval mode: the reference a full or freeze run compares with."""
    model = load_base_model(base_path, config.model_copy(update={"method": "lora"}), device, dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _examples_digest(examples: list, base_path: Path) -> str:
    """What the stored log-probabilities are of: the base model's folder and every example's tokens."""
    h = hashlib.sha256(str(base_path).encode())
    for example in examples:
        h.update(json.dumps([v for k, v in vars(example).items() if k != "reference_logps"], default=str).encode())
    return h.hexdigest()


@torch.no_grad()
def _logps(t: TrainingObjective, model, examples: list, pad_id: int, precision, device) -> list[tuple[float, float]]:
    """Each example's reference log-probabilities (chosen, rejected; KTO: completion, mismatched completion)."""
    found = []
    for start in range(0, len(examples), PRECOMPUTE_BATCH):
        part = examples[start:start + PRECOMPUTE_BATCH]
        batch = {k: v.to(device) for k, v in t.collate([[e] for e in part], pad_id, packed=False).items()}
        n = len(part)
        with precision.autocast():
            if "kl_input_ids" in batch:  # KTO: the rows, then their mismatched rows
                first = group_logps(model, batch, n)[0]
                second = group_logps(model, kl_rows(batch), n)[0]
            else:
                sums = group_logps(model, batch, 2 * n)[0]
                first, second = sums[:n], sums[n:]
        found += list(zip(first.float().tolist(), second.float().tolist()))
    return found


def precompute(t: TrainingObjective, model, data, run_dir: Path, base_path: Path, pad_id: int, precision,
               device: torch.device, notify) -> None:
    """Set every training and held-out example's reference_logps: read from the run folder where it holds
    them for these examples and this base, else computed now by `model` (in eval mode) and written there."""
    examples = data.train + data.eval
    digest = _examples_digest(examples, base_path)
    path = run_dir / REFERENCE_LOGPS
    stored = _read(path)
    if stored.get("digest") == digest and len(stored.get("logps", [])) == len(examples):
        values = [tuple(v) for v in stored["logps"]]
    else:
        notify(f"reference: computing the base model's log-probabilities of {len(examples)} examples once, "
               f"before training (kept in {path.name})")
        was_training = model.training
        model.eval()
        values = _logps(t, model, examples, pad_id, precision, device)
        model.train(was_training)
        write_json_atomic(path, {"digest": digest, "logps": values})
    for example, value in zip(examples, values):
        example.reference_logps = value


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # damaged: computed again
    if not isinstance(stored, dict):
        raise UserError(f"{path}: not the reference log-probabilities snugtune writes; move it aside")
    return stored
