"""Causal-LM loss computed from hidden states in chunks, never materialising full-vocabulary logits.

Only positions with a trained label go through the output head. When the head is frozen (every LoRA
method) its gradient is not needed, so each chunk's gradient with respect to the hidden states is
computed right in the forward, as fused linear + cross-entropy kernels do:

    loss = logsumexp(h W^T) - (h W^T)[target]        d loss / d h = (softmax(h W^T) - onehot(target)) W

That saves recomputing the chunk's logits in backward (one head matmul) and holds one chunk of logits
in place at a time (fp32 logits turned into probabilities, plus their compute-dtype copy for the
matmul). A trained head keeps the checkpointed per-chunk path, which recomputes logits in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from snugtune.data.tokenize import IGNORE
from snugtune.lora_dropout import advance_lora_dropout
from snugtune.memory_rules import LOGITS_CHUNK_BYTES, logits_chunk_tokens as _chunk_tokens
from snugtune.models.load import causal_lm_parts


def logits_chunk_tokens(vocab: int) -> int:
    """Positions whose logits are computed at once (memory_rules.logits_chunk_tokens, the planner's rule)."""
    return _chunk_tokens(vocab, LOGITS_CHUNK_BYTES)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over rows of `hidden` [N, H] through a frozen head `weight` [V, H]; the
    gradient for `hidden` is computed in forward, chunk by chunk, and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, owners=None, groups=0):
        weight = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        total = torch.zeros(() if owners is None else (groups,), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                scored = (t != IGNORE).float()                       # fixed-shape batches keep ignored rows
                t = t.clamp_min(0)
                logits = (h @ weight.t()).float()                    # [c, V]; the 16-bit product is freed here
                rows = torch.arange(t.shape[0], device=t.device)
                picked = logits[rows, t]
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()                      # in place: no second [c, V] fp32 tensor
                norm = probs.sum(dim=-1, keepdim=True)
                row_loss = (top.squeeze(1) + norm.log().squeeze(1) - picked) * scored
                if owners is None:
                    total += row_loss.sum()
                else:  # each row's loss to its group's sum: a fixed shape, no host synchronisation
                    total.index_add_(0, owners[start:start + chunk], row_loss)
                probs.div_(norm.div_(scored.unsqueeze(1)))           # ignored rows: inf norm, zero gradient
                probs[rows, t] -= scored                             # softmax - onehot
                grad_hidden[start:start + chunk] = probs.to(dtype) @ weight
        ctx.save_for_backward(grad_hidden, owners)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, owners = ctx.saved_tensors
        scale = grad_total if owners is None else grad_total[owners].unsqueeze(1)  # each row its group's
        return (grad_hidden.float() * scale).to(ctx.hidden_dtype), None, None, None, None, None, None


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    owners: torch.Tensor | None = None, groups: int = 0) -> torch.Tensor:
    logits = head(hidden).float()
    if owners is None:
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    losses = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
    return losses.new_zeros(groups).index_add(0, owners, losses)


def _frozen_plain_head(head: torch.nn.Module) -> bool:
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and not head._forward_hooks and not head._forward_pre_hooks)


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  owners: torch.Tensor | None = None, groups: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropy of `hidden` [N, H] against `targets` [N] through `head`, in chunks
    of logits_chunk_tokens() positions (fp32 logits); targets equal to IGNORE count nothing.

    With owners [N] (0 <= owner < groups): sums [groups], each row adding to the group it names (rows whose
    target is IGNORE add nothing, whatever their owner). Every row still goes through the head: shapes do
    not depend on the data and nothing waits on the GPU (a preference step captured as a CUDA graph)."""
    chunk = logits_chunk_tokens(head.weight.shape[0])
    if _frozen_plain_head(head) and torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, chunk, _compute_dtype(hidden), owners,
                                             groups)
    total = hidden.new_zeros(() if owners is None else groups, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        o = None if owners is None else owners[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, h, t, o, groups, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, t, o, groups)
    return total


def document_bounds(batch: dict[str, torch.Tensor]) -> dict:
    """Packed rows' document starts (data.batches.collate_packed) as transformers' variable-length
    attention arguments, which reach snugtune.attention; none for rows of one document or padded rows."""
    if "cu_seq_lens" not in batch:
        return {}
    length = batch["labels"].shape[1]
    return {"cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
            "max_length_q": length, "max_length_k": length}


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] for a batch of input_ids, or inputs_embeds already looked
    up (engine.graphs, with the table in host memory); the caller applies the head, in chunks."""
    backbone, _ = causal_lm_parts(model)
    if model.training:  # fresh LoRA dropout masks for each micro-batch (inside a CUDA graph too)
        advance_lora_dropout(model)
    return backbone(input_ids=batch.get("input_ids"), inputs_embeds=batch.get("inputs_embeds"),
                    attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                    use_cache=False, **document_bounds(batch)).last_hidden_state


def token_loss_sum(model, batch: dict[str, torch.Tensor], fixed_shape: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over trained positions, number of those positions) of a batch
    (final_hidden reads it).

    fixed_shape: every position goes through the head, untrained ones weighted zero, and the count is
    not taken (returned as -1): no host synchronisation or data-dependent shape (CUDA graph capture)."""
    hidden = final_hidden(model, batch)
    head = causal_lm_parts(model)[1]
    targets = batch["labels"][:, 1:]
    if fixed_shape:
        return head_loss_sum(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)), -1
    keep = targets != IGNORE
    hidden = hidden[:, :-1][keep]
    targets = targets[keep]
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    return head_loss_sum(head, hidden, targets), n


class LossModule(torch.nn.Module):
    """The model plus our loss, as one module whose forward DDP can wrap (its hooks sync the gradients)."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(self.model, batch)


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
