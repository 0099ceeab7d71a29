"""Causal-LM loss computed from hidden states in chunks, never materialising full-vocabulary logits.

Only positions with a trained label go through the output head; each chunk's logits are
recomputed in backward (checkpointed), so peak memory holds one chunk of logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from snugtune.data.tokenize import IGNORE
from snugtune.engine.distributed import LossModule
from snugtune.models import causal_lm_parts

LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 logits held at once


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over trained positions, number of those positions)."""
    backbone, head = causal_lm_parts(model)
    # packed batches carry restarting position_ids and no attention_mask: transformers then builds a
    # block-diagonal causal mask (use_cache=False is required for that detection)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden = hidden[:, :-1][keep]
    targets = targets[keep]
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    vocab = head.weight.shape[0]
    chunk = max(64, LOGITS_CHUNK_BYTES // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, t)
    return total, n


@torch.no_grad()
def mean_loss(model, batches, precision, device: torch.device) -> tuple[float, int]:
    """Token-weighted mean loss over batches, and the number of scored tokens. Model left in train mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast():  # an FSDP root (LossModule) must be called for its gathers to run
            loss_sum, n = model(batch) if isinstance(model, LossModule) else token_loss_sum(model, batch)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count
