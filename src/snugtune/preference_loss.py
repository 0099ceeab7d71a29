"""Preference objectives — DPO, ORPO and KTO — from summed log-probabilities of answers, as TRL computes them.

The model side is one function, group_logps: one forward, then the output head in chunks (loss.head_loss_sum,
so full-vocabulary logits never exist), summing the log-probabilities of the scored tokens of each group (an
answer; ORPO's prompt). The objectives are functions of those sums, with TRL 1.16's formulas and defaults
(docs/preference.md cites the function each one follows):

    DPO   sigmoid  -log σ(β Δ)          Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))
          hinge    max(0, 1 - β Δ)
          ipo      (Δ_per_token - 1 / 2β)^2     (each log-ratio divided by its answer's token count)
          robust   ((1 - ε)(-log σ(β Δ)) + ε log σ(-β Δ)) / (1 - 2ε)
    ORPO  NLL(chosen) - β log σ(log odds(ȳ_w) - log odds(ȳ_l))    ȳ: mean log-prob per token, odds p / (1 - p)
    KTO   desirable   w_d (1 - σ(β (r - z)))     r = log π(y|x) - log π_ref(y|x)
          undesirable w_u (1 - σ(β (z - r)))     z = max(0, mean of r over mismatched (x, y') pairs), no gradient

Each returns a PreferenceLoss: the per-example losses (whose mean is TRL's loss) and the metrics TRL logs, as
sums with their counts so that micro-batches of one optimizer step add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from snugtune.data.tokenize import IGNORE
from snugtune.loss import final_hidden, head_loss_sum
from snugtune.models.load import causal_lm_parts

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def group_logps(model, batch: dict[str, torch.Tensor], groups: int,
                fixed_shape: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities [groups], number of scored tokens [groups]) of each group's tokens.

    The batch is what final_hidden reads, plus labels (IGNORE: not scored) and label_groups [B, T]: at each
    scored position, the group its token belongs to (0 <= group < groups).

    fixed_shape: every position goes through the head and adds to its group's sum (unscored ones nothing),
    with no host synchronisation or data-dependent shape (a step captured as a CUDA graph); else only the
    scored positions, gathered answer by answer."""
    hidden = final_hidden(model, batch)
    head = causal_lm_parts(model)[1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if fixed_shape:
        owners = torch.where(keep, batch["label_groups"][:, 1:], 0).reshape(-1)
        sums = -head_loss_sum(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1), owners,
                              groups)
        return sums, torch.zeros(groups, dtype=torch.long, device=owners.device).index_add_(
            0, owners, keep.reshape(-1).long())
    owners = batch["label_groups"][:, 1:][keep]
    if owners.numel() and not 0 <= int(owners.min()) <= int(owners.max()) < groups:
        raise ValueError(f"label_groups holds a group outside 0..{groups - 1}")
    order = torch.argsort(owners, stable=True)  # each group's tokens side by side
    counts = torch.bincount(owners, minlength=groups)
    sizes = counts.tolist()
    hidden, targets = hidden[:, :-1][keep][order], targets[keep][order]
    sums = [-head_loss_sum(head, h, t) for h, t in zip(hidden.split(sizes), targets.split(sizes))]
    return torch.stack(sums), counts


@dataclass
class PreferenceLoss:
    """A batch's preference loss: per-example losses (pairs, or KTO rows), ORPO's NLL, and TRL's metrics."""
    losses: torch.Tensor
    nll_sum: torch.Tensor | None = None
    nll_tokens: torch.Tensor | None = None
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name: (sum, count)

    def loss(self, examples: int | None = None, nll_tokens: int | None = None) -> torch.Tensor:
        """TRL's loss of this batch: the mean over its examples (plus ORPO's NLL, a mean over its tokens).
        Given a whole optimizer step's counts, this micro-batch's share of the step's loss instead."""
        total = self.losses.sum() / (examples or self.losses.numel())
        if self.nll_sum is not None:
            total = total + self.nll_sum / (nll_tokens or self.nll_tokens)
        return total

    def metric_means(self) -> dict[str, float]:
        return metric_means(self.metrics)


def metric_means(metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Each metric's mean over what it covers (from its sum and count), and the reward margin (chosen minus
    rejected)."""
    means = {name: float(total) / float(count) for name, (total, count) in metrics.items() if count > 0}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def _over(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the values' sum, their count): the count a host tensor, which a CUDA graph's capture cannot copy over."""
    values = values.detach()
    return values.sum(), torch.tensor(values.numel())


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    return {"rewards/chosen": _over(chosen_rewards), "rewards/rejected": _over(rejected_rewards),
            "rewards/accuracies": _over((chosen_rewards > rejected_rewards).float()),
            "logps/chosen": _over(chosen_logps), "logps/rejected": _over(rejected_logps)}


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO on summed answer log-probabilities [pairs] of the policy and the reference (TRL's DPOTrainer).
    label_smoothing is robust DPO's ε, the chance that a pair's preference is flipped."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":  # per-token log-ratios, so that β means the same at any answer length (TRL's note)
        per_token = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss type '{loss_type}' (known: {', '.join(DPO_LOSS_TYPES)})")
    return PreferenceLoss(losses, metrics=_pair_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen, rejected))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, each branch where it keeps its precision (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, beta: float = 0.1, chosen_prompt: torch.Tensor | None = None,
              chosen_prompt_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """ORPO from the policy alone (no reference): summed answer log-probabilities [pairs] and their token
    counts. The NLL term covers the chosen answers' tokens, and the chosen prompts' when given (TRL's
    ORPOTrainer scores the whole chosen sequence)."""
    chosen_mean = chosen.float() / chosen_tokens.clamp_min(1)
    rejected_mean = rejected.float() / rejected_tokens.clamp_min(1)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    nll_sum, nll_tokens = -chosen.sum(), chosen_tokens.sum()
    if chosen_prompt is not None:
        nll_sum, nll_tokens = nll_sum - chosen_prompt.sum(), nll_tokens + chosen_prompt_tokens.sum()
    metrics = _pair_metrics(beta * chosen_mean, beta * rejected_mean, chosen_mean, rejected_mean)
    metrics.update({"nll_loss": (nll_sum.detach(), nll_tokens), "log_odds_ratio": _over(ratio),
                    "log_odds_chosen": _over(log_odds)})
    return PreferenceLoss(-beta * ratio, nll_sum, nll_tokens, metrics)


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z from mismatched (prompt, completion) pairs: the mean log-ratio of the policy
    (without gradient) to the reference, at least 0."""
    return (kl_logps - kl_ref_logps).mean().clamp(min=0).detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO on summed completion log-probabilities [rows] with their labels (TRL's KTOTrainer), against the
    reference point kl (kto_reference_point: TRL estimates it over each batch's rows)."""
    ratio = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio
    metrics = {"kl": (kl, torch.tensor(1, device=kl.device)),
               "rewards/chosen": _over(rewards[desirable]), "rewards/rejected": _over(rewards[~desirable]),
               "logps/chosen": _over(logps[desirable]), "logps/rejected": _over(logps[~desirable])}
    return PreferenceLoss(losses, metrics=metrics)
