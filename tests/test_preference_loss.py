"""preference_loss.py: DPO, ORPO and KTO against TRL's own trainers on the same numbers.

TRL computes these losses inside its trainers' loss methods, reading per-token log-probabilities from the
model's fused head. The harness below runs those methods (TRL 1.16) on a stand-in model whose per-token
log-probabilities are the sequence log-probabilities under test, so loss, gradients and logged metrics
come from TRL's code itself.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from trl.experimental.orpo import ORPOTrainer  # the Makefile installs TRL (pinned in constraints.txt)
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from snugtune.preference_loss import (DPO_LOSS_TYPES, PreferenceLoss, dpo_loss, group_logps, kto_loss, kto_reference_point,
                                      orpo_loss)

CPU = torch.device("cpu")


class _StandInModel:
    """Answers TRL's fused-head call with given per-sequence log-probabilities, one sequence per row: each
    row's per-token values sum to its sequence's log-probability (they sit in the row's first position)."""

    def __init__(self, by_width: dict[int, torch.Tensor]):
        self.by_width = by_width  # input width -> log-probabilities [rows]
        self.training = True

    def __call__(self, input_ids, **_):
        logps = self.by_width[input_ids.shape[1]]
        per_token = F.pad(logps[:, None], (0, input_ids.shape[1] - 2))
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool(), aux_loss=None)


def _trainer_stand_in(model, **fields):
    """What TRL's loss methods read from `self`, on one process."""
    accelerator = types.SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        unwrap_model=lambda m: m)
    return types.SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, _tp_size=1,
                                 _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                                 **fields)


def _completion_mask(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of one prompt token then `tokens[i]` completion tokens, padded to width."""
    columns = torch.arange(width)
    return ((columns >= 1) & (columns <= tokens[:, None])).long()


def _trl_dpo(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta, loss_type,
             label_smoothing):
    """(loss, d loss / d chosen, d loss / d rejected, metrics) from DPOTrainer._compute_loss."""
    policy = torch.cat([chosen, rejected]).detach().requires_grad_()
    tokens = torch.cat([chosen_tokens, rejected_tokens])
    width = int(tokens.max()) + 2
    model = _StandInModel({width: policy})
    trainer = _trainer_stand_in(model, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                                loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                                use_weighting=False, args=types.SimpleNamespace(discopop_tau=0.05))
    inputs = {"input_ids": torch.zeros(len(tokens), width, dtype=torch.long),
              "attention_mask": torch.ones(len(tokens), width, dtype=torch.long),
              "completion_mask": _completion_mask(tokens, width),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    n = len(chosen)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), policy.grad[:n], policy.grad[n:], metrics


def _ours(objective: PreferenceLoss, *leaves):
    loss = objective.loss()
    loss.backward()
    return (float(loss.detach()), *[leaf.grad for leaf in leaves], objective.metric_means())


def _pair_case(seed: int, pairs: int, scale: float):
    """Log-probabilities of pairs: sums over answers of 1-40 tokens, policy near the reference."""
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 40, (pairs,), generator=g)
    rejected_tokens = torch.randint(1, 40, (pairs,), generator=g)
    ref_chosen = -scale * torch.rand(pairs, generator=g, dtype=torch.float64) * chosen_tokens
    ref_rejected = -scale * torch.rand(pairs, generator=g, dtype=torch.float64) * rejected_tokens
    chosen = ref_chosen + scale * torch.randn(pairs, generator=g, dtype=torch.float64)
    rejected = ref_rejected + scale * torch.randn(pairs, generator=g, dtype=torch.float64)
    return chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens


DPO_CASES = [  # (loss type, beta, label smoothing, seed, pairs, scale): typical, sharp, flat, far from the reference
    *[(t, 0.1, 0.0, 0, 8, 1.0) for t in DPO_LOSS_TYPES],
    ("robust", 0.1, 0.1, 1, 8, 1.0), ("robust", 0.5, 0.49, 2, 5, 3.0), ("sigmoid", 5.0, 0.0, 3, 4, 10.0),
    ("hinge", 2.0, 0.0, 4, 16, 5.0), ("ipo", 0.01, 0.0, 5, 3, 0.5), ("sigmoid", 0.1, 0.0, 6, 1, 300.0),
    ("ipo", 1.0, 0.0, 7, 2, 50.0),
]


@pytest.mark.parametrize("loss_type, beta, smoothing, seed, pairs, scale", DPO_CASES)
def test_dpo_loss_gradients_and_metrics_match_trl(loss_type, beta, smoothing, seed, pairs, scale):
    chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens = _pair_case(seed, pairs, scale)
    ref_loss, ref_grad_c, ref_grad_r, ref_metrics = _trl_dpo(chosen, rejected, ref_chosen, ref_rejected,
                                                             chosen_tokens, rejected_tokens, beta, loss_type, smoothing)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss, grad_c, grad_r, metrics = _ours(dpo_loss(c, r, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                                                   beta, loss_type, smoothing), c, r)
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad_c, ref_grad_c, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_r, ref_grad_r, rtol=1e-9, atol=1e-12)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-6, abs=1e-9), name


def test_dpo_loss_ties_and_a_policy_equal_to_its_reference():
    # the first step of every run: policy = reference, so every pair sits at log 2 and accuracy counts no tie
    logps = torch.tensor([-12.0, -30.5, -7.25], requires_grad=True)
    out = dpo_loss(logps, logps.detach().clone(), logps.detach(), logps.detach(), torch.ones(3), torch.ones(3))
    assert float(out.loss().detach()) == pytest.approx(0.6931471805599453)
    assert out.metric_means()["rewards/accuracies"] == 0.0 and out.metric_means()["rewards/margins"] == 0.0
    with pytest.raises(ValueError, match="unknown DPO loss type 'kto'"):
        dpo_loss(logps, logps, logps, logps, torch.ones(3), torch.ones(3), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        dpo_loss(logps, logps, logps, logps, torch.ones(3), torch.ones(3), loss_type="robust", label_smoothing=0.5)


def test_step_share_adds_up_to_the_whole_batch_loss():
    # micro-batches of one optimizer step, each divided by the step's counts, sum to the step's loss
    chosen, rejected, ref_chosen, ref_rejected, ct, rt = _pair_case(11, 10, 1.0)
    chosen, rejected = -chosen.abs(), -rejected.abs()
    whole = orpo_loss(chosen, rejected, ct, rt, chosen_prompt=ref_chosen, chosen_prompt_tokens=ct + 3)
    parts = [orpo_loss(chosen[s], rejected[s], ct[s], rt[s], chosen_prompt=ref_chosen[s], chosen_prompt_tokens=ct[s] + 3)
             for s in (slice(0, 3), slice(3, 10))]
    shared = sum(p.loss(examples=10, nll_tokens=int(whole.nll_tokens)) for p in parts)
    assert float(shared) == pytest.approx(float(whole.loss()), rel=1e-6)  # ORPO works in fp32, as TRL does


def _trl_orpo_terms(chosen_mean, rejected_mean, beta):
    trainer = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=CPU))
    return ORPOTrainer.odds_ratio_loss(trainer, chosen_mean, rejected_mean)


@pytest.mark.parametrize("seed, pairs, beta, scale", [(0, 8, 0.1, 1.0), (1, 3, 1.0, 0.01), (2, 5, 0.25, 8.0),
                                                      (3, 1, 0.1, 40.0)])
def test_orpo_odds_ratio_term_and_metrics_match_trl(seed, pairs, beta, scale):
    chosen, rejected, _, _, chosen_tokens, rejected_tokens = _pair_case(seed, pairs, scale)
    chosen, rejected = -chosen.abs() - 1e-3, -rejected.abs() - 1e-3  # log-probabilities are negative
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    out = orpo_loss(c, r, chosen_tokens, rejected_tokens, beta)
    (out.losses.mean()).backward()
    cm = (chosen / chosen_tokens).requires_grad_()
    rm = (rejected / rejected_tokens).requires_grad_()
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = _trl_orpo_terms(cm, rm, beta)
    (-losses.mean()).backward()  # TRL: loss = nll - losses.mean()
    torch.testing.assert_close(out.losses.detach(), -losses.detach(), rtol=1e-6, atol=1e-9)  # both in fp32
    torch.testing.assert_close(c.grad, cm.grad / chosen_tokens, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(r.grad, rm.grad / rejected_tokens, rtol=1e-5, atol=1e-12)
    means = out.metric_means()
    assert means["log_odds_ratio"] == pytest.approx(float(ratio.detach()), rel=1e-6)
    assert means["log_odds_chosen"] == pytest.approx(float(log_odds.detach()), rel=1e-6, abs=1e-9)
    assert means["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), rel=1e-6)
    assert means["rewards/accuracies"] == pytest.approx(float((chosen_rewards > rejected_rewards).float().mean()))
    assert means["nll_loss"] == pytest.approx(float(-chosen.sum() / chosen_tokens.sum()), rel=1e-9)


def _trl_kto(logps, ref_logps, labels, kl_logps, kl_ref_logps, beta, desirable_weight, undesirable_weight):
    """(loss, d loss / d logps, metrics) from KTOTrainer._compute_loss with precomputed reference values."""
    policy = logps.detach().clone().requires_grad_()
    width = 6
    model = _StandInModel({width: policy, width + 1: kl_logps})
    trainer = _trainer_stand_in(model, loss_type="kto", calculate_KL=True, beta=beta, precompute_ref_logps=True,
                                desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    rows = len(logps)
    mask = _completion_mask(torch.full((rows,), 3), width)
    batch = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones_like(mask),
             "completion_mask": mask, "KL_input_ids": torch.zeros(rows, width + 1, dtype=torch.long),
             "KL_attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
             "KL_completion_mask": _completion_mask(torch.full((rows,), 3), width + 1),
             "label": labels, "ref_logps": ref_logps, "ref_KL_logps": kl_ref_logps}
    loss = KTOTrainer._compute_loss(trainer, model, batch, False)
    loss.backward()
    return float(loss.detach()), policy.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


KTO_CASES = [  # (seed, rows, desirable share, beta, desirable weight, undesirable weight, scale)
    (0, 8, 0.5, 0.1, 1.0, 1.0, 1.0), (1, 6, 0.2, 0.1, 1.33, 1.0, 3.0), (2, 5, 0.8, 1.0, 1.0, 0.7, 0.3),
    (3, 4, 1.0, 0.1, 1.0, 1.0, 2.0), (4, 4, 0.0, 0.5, 1.0, 1.0, 2.0), (5, 9, 0.5, 0.05, 2.0, 1.0, 30.0),
]


@pytest.mark.parametrize("seed, rows, share, beta, wd, wu, scale", KTO_CASES)
def test_kto_loss_gradients_and_metrics_match_trl(seed, rows, share, beta, wd, wu, scale):
    g = torch.Generator().manual_seed(seed)
    ref = -20 * torch.rand(rows, generator=g, dtype=torch.float64)
    logps = ref + scale * torch.randn(rows, generator=g, dtype=torch.float64)
    kl_ref = -20 * torch.rand(rows, generator=g, dtype=torch.float64)
    kl = kl_ref + scale * torch.randn(rows, generator=g, dtype=torch.float64)
    labels = torch.arange(rows) < round(share * rows)
    labels = labels[torch.randperm(rows, generator=g)]
    ref_loss, ref_grad, ref_metrics = _trl_kto(logps, ref, labels, kl, kl_ref, beta, wd, wu)
    policy = logps.clone().requires_grad_()
    loss, grad, metrics = _ours(kto_loss(policy, ref, labels, kto_reference_point(kl, kl_ref), beta, wd, wu), policy)
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    for name, value in ref_metrics.items():
        if name in metrics:
            assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert set(ref_metrics) - {"entropy", "num_tokens", "logits/chosen", "logits/rejected"} <= set(metrics)


def test_config_offers_these_loss_types_with_trls_defaults(tmp_path):
    import inspect
    from typing import get_args
    from trl import DPOConfig, KTOConfig
    from trl.experimental.orpo import ORPOConfig
    from snugtune.config import PREFERENCE_FIELD_OBJECTIVES, PreferenceConfig
    assert get_args(PreferenceConfig.model_fields["loss_type"].annotation) == DPO_LOSS_TYPES
    assert set(PREFERENCE_FIELD_OBJECTIVES) == set(PreferenceConfig.model_fields)
    ours = PreferenceConfig()
    dpo, kto, orpo = (c(output_dir=str(tmp_path), use_cpu=True) for c in (DPOConfig, KTOConfig, ORPOConfig))
    assert ours.beta == dpo.beta == kto.beta == orpo.beta
    assert ([ours.loss_type], ours.label_smoothing) == (dpo.loss_type, dpo.label_smoothing)
    assert (ours.desirable_weight, ours.undesirable_weight) == (kto.desirable_weight, kto.undesirable_weight)
    for function in (dpo_loss, orpo_loss, kto_loss):  # the functions' own defaults are the config's
        for name, parameter in inspect.signature(function).parameters.items():
            if name in PreferenceConfig.model_fields:
                assert parameter.default == getattr(ours, name), (function.__name__, name)


# --- group_logps: the model side --------------------------------------------------------------------------


def _full_logit_group_sums(model, batch, groups):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
    targets, owners = batch["labels"][:, 1:], batch["label_groups"][:, 1:]
    picked = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    scored = targets != -100
    return torch.stack([picked[scored & (owners == g)].sum() for g in range(groups)])


def test_group_logps_sums_each_groups_tokens_as_full_logits_would(tmp_path, alpaca_file, monkeypatch):
    import snugtune.loss as loss_module
    from conftest import tiny_model
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 3 * 4 * 49152)  # chunks of 3 positions: many per group
    _, model, _, _ = tiny_model(tmp_path, alpaca_file)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 20), generator=g)
    labels = torch.where(torch.rand(3, 20, generator=g) < 0.7, ids, torch.full_like(ids, -100))
    owners = torch.randint(0, 4, (3, 20), generator=g)
    owners[:, :] = torch.where(owners == 2, 3, owners)  # group 2 scores nothing: its sum is 0
    batch = {"input_ids": ids, "labels": labels, "label_groups": owners}
    model.eval()
    expected = _full_logit_group_sums(model, batch, 5)
    unscored = torch.where(labels == -100, torch.randint(-100, 5, (3, 20), generator=g), owners)
    for fixed_shape in (False, True):  # fixed: every position through the head (a CUDA graph's step)
        with torch.no_grad():  # an unscored position's group is anything: it adds nothing
            sums, counts = group_logps(model, {**batch, "label_groups": unscored}, 5, fixed_shape)
        torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)
        assert counts.tolist() == [int(((labels[:, 1:] != -100) & (owners[:, 1:] == k)).sum()) for k in range(5)]
        assert float(sums[2]) == 0.0 and float(sums[4]) == 0.0
    with pytest.raises(ValueError, match="outside 0..2"):
        group_logps(model, batch, 3)


def test_fixed_shape_group_logps_give_the_lora_gradients_of_the_gathered_path(tmp_path, alpaca_file, monkeypatch):
    import snugtune.loss as loss_module
    from conftest import tiny_model, trainable_grads
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 7 * 4 * 49152)
    _, model, _, _ = tiny_model(tmp_path, alpaca_file)
    for name, p in model.named_parameters():  # a moved adapter: every LoRA weight has a gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    labels = torch.where(torch.rand(2, 24, generator=g) < 0.6, ids, torch.full_like(ids, -100))
    owners = torch.where(labels == -100, -100, torch.randint(0, 3, (2, 24), generator=g))
    batch = {"input_ids": ids, "labels": labels, "label_groups": owners}
    weights = torch.tensor([0.5, -2.0, 1.5])  # each group's sum weighted apart, as a DPO loss weighs them
    results = []
    for fixed_shape in (False, True):
        model.zero_grad(set_to_none=True)
        sums, _ = group_logps(model, batch, 3, fixed_shape)
        (sums * weights).sum().backward()
        results.append((sums.detach(), trainable_grads(model)))
    (sums, grads), (fixed_sums, fixed_grads) = results
    torch.testing.assert_close(fixed_sums, sums, rtol=1e-5, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- against TRL's trainers on a tiny LoRA model: tokenization, batches, loss and LoRA gradients ----------------


def _trl_ready_model(tmp_path):
    """A shape:tiny LoRA model (fp32, CPU) and its tokenizer."""
    from conftest import alpaca_rows, tiny_model, write_jsonl
    _, model, tokenizer, _ = tiny_model(tmp_path, write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4)))
    return model, tokenizer


def _move_trained_lora(model):
    """Random LoRA B weights for the trained adapter, so that the policy differs from the reference (TRL keeps
    the adapter as it was handed over, with B = 0, as its 'ref' adapter: the base model)."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name and p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name, grad in theirs.items():
        assert float((ours[name] - grad).norm()) <= 1e-4 * float(grad.norm()) + 1e-9, name


def _assert_same_step(model, trl_step, our_step) -> None:
    """TRL's step (a callable giving its loss and logged metrics) and ours (a callable giving a PreferenceLoss),
    from the same weights, give the same loss, LoRA gradients and metrics."""
    model.train()
    model.zero_grad()
    trl_loss, trl_metrics = trl_step()
    trl_loss.backward()
    trl_grads = _lora_grads(model)
    model.zero_grad()
    ours = our_step()
    loss = ours.loss()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5)
    loss.backward()
    _assert_same_grads(_lora_grads(model), trl_grads)
    for name, value in ours.metric_means().items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def _logged(trainer, loss):
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _trl_args(config_class, tmp_path, **fields):
    return config_class(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                        per_device_train_batch_size=4, **fields)


def _conversation_rows():
    """Four TRL conversational rows of different prompt and answer lengths."""
    return [{"prompt": [{"role": "user", "content": f"Add {i} and {i + 1}." * (i + 1)}],
             "chosen": [{"role": "assistant", "content": f"It is {2 * i + 1}."}],
             "rejected": [{"role": "assistant", "content": f"No idea {i}, sorry." * (3 - i) * 2}]} for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_on_a_model_matches_trls_dpo_trainer(tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig
    from snugtune.data.rows import Row
    from snugtune.data.preference_batches import pair_batch
    from snugtune.data.preference_rows import to_pair
    from snugtune.data.preference_tokenize import fit_pair, tokenize_pair
    model, tokenizer = _trl_ready_model(tmp_path)
    rows, max_len = _conversation_rows(), 64  # the longest pair is cut: truncation is compared too
    trainer = DPOTrainer(model=model, args=_trl_args(DPOConfig, tmp_path, max_length=max_len, loss_type=[loss_type]),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    _move_trained_lora(model)
    pairs = [tokenize_pair(to_pair(Row(f"rows:{i}", row)), tokenizer, f"rows:{i}") for i, row in enumerate(rows)]
    for pair, tokenized in zip(pairs, trainer.train_dataset):  # our tokens are TRL's
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == \
            (tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"])
    theirs = trainer.data_collator(list(trainer.train_dataset))
    batch = pair_batch([fit_pair(p, max_len, "truncate") for p in pairs], tokenizer.pad_token_id)
    assert torch.equal(batch.tensors["input_ids"], theirs["input_ids"])
    assert max(len(p.prompt_ids) + len(p.rejected_ids) for p in pairs) > max_len


    def ours():
        sums, counts = group_logps(model, batch.tensors, batch.groups)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = group_logps(model, batch.tensors, batch.groups)
        return dpo_loss(sums[:4], sums[4:], ref[:4], ref[4:], counts[:4], counts[4:], loss_type=loss_type)

    _assert_same_step(model, lambda: _logged(trainer, trainer.compute_loss(model, theirs)), ours)


@pytest.mark.slow
def test_kto_on_a_model_matches_trls_kto_trainer(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig
    from snugtune.data.rows import Row
    from snugtune.data.preference_batches import kl_rows, labelled_batch
    from snugtune.data.preference_rows import to_labelled
    from snugtune.data.preference_tokenize import fit_completion, kl_partners, tokenize_labelled
    model, tokenizer = _trl_ready_model(tmp_path)
    rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": i != 2}
            for i, r in enumerate(_conversation_rows())]
    max_len = 72
    trainer = KTOTrainer(model=model, args=_trl_args(KTOConfig, tmp_path, max_length=max_len),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    _move_trained_lora(model)
    tokenized = [tokenize_labelled(to_labelled(Row(f"rows:{i}", row)), tokenizer, "rows") for i, row in enumerate(rows)]
    for ours, theirs in zip(tokenized, trainer.train_dataset):
        assert (ours.prompt_ids, ours.completion_ids) == (theirs["prompt_ids"], theirs["completion_ids"])
    theirs = trainer.data_collator(list(trainer.train_dataset))
    batch = labelled_batch(kl_partners([fit_completion(r, max_len, "truncate") for r in tokenized], max_len),
                           tokenizer.pad_token_id)
    matched, mismatched, desirable = batch.tensors, kl_rows(batch.tensors), batch.tensors["desirable"]
    assert torch.equal(matched["input_ids"], theirs["input_ids"])
    assert torch.equal(mismatched["input_ids"], theirs["KL_input_ids"])


    def ours():
        sums, _ = group_logps(model, matched, 4)
        with torch.no_grad():
            kl, _ = group_logps(model, mismatched, 4)
            with model.disable_adapter():
                ref, _ = group_logps(model, matched, 4)
                kl_ref, _ = group_logps(model, mismatched, 4)
        return kto_loss(sums, ref, desirable, kto_reference_point(kl, kl_ref))

    _assert_same_step(model, lambda: _logged(trainer, trainer.compute_loss(model, theirs)), ours)


@pytest.mark.slow
def test_orpo_on_a_model_matches_trls_orpo_trainer(tmp_path):
    # on TRL's own tokens: its experimental ORPOTrainer tokenizes rendered text and appends a second EOS
    # after ChatML's end-of-turn line, which our tokenization (TRL DPOTrainer's) does not
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig
    from snugtune.data.preference_batches import pair_batch
    from snugtune.data.preference_tokenize import TokenizedPair
    model, tokenizer = _trl_ready_model(tmp_path)
    trainer = ORPOTrainer(model=model, args=_trl_args(ORPOConfig, tmp_path, max_length=128, remove_unused_columns=False),
                          train_dataset=Dataset.from_list(_conversation_rows()), processing_class=tokenizer)
    _move_trained_lora(model)

    def as_pair(row) -> TokenizedPair:
        cut = row["chosen_labels"].count(-100)
        assert row["rejected_input_ids"][:cut] == row["chosen_input_ids"][:cut]
        return TokenizedPair(row["chosen_input_ids"][:cut], row["chosen_input_ids"][cut:], row["chosen_labels"][cut:],
                             row["rejected_input_ids"][cut:], row["rejected_labels"][cut:])

    batch = pair_batch([as_pair(row) for row in trainer.train_dataset], tokenizer.pad_token_id, prompt_nll=True)
    theirs = trainer.data_collator(list(trainer.train_dataset))

    def ours():
        sums, counts = group_logps(model, batch.tensors, batch.groups)
        return orpo_loss(sums[:4], sums[4:8], counts[:4], counts[4:8], chosen_prompt=sums[8:],
                         chosen_prompt_tokens=counts[8:])

    _assert_same_step(model, lambda: trainer.get_batch_loss_metrics(model, theirs), ours)
