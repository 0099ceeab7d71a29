"""loss.py: the chunked causal-LM loss against full-logit cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

import snugtune.loss as loss_module
from snugtune.data.tokenize import IGNORE
from snugtune.loss import head_loss_sum, logits_chunk_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_trained", [False, True])
def test_chunked_loss_matches_full_logits_cross_entropy(monkeypatch, dtype, head_trained):
    # a frozen head takes the gradient-in-forward path, a trained one the recomputing path; both against
    # one cross-entropy over the full logits, with several chunks and a ragged last one
    torch.manual_seed(0)
    vocab, width, n, chunk_rows = 1000, 32, 300, 64
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", chunk_rows * 4 * vocab)  # several chunks of a small vocab
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight.requires_grad_(head_trained)
    hidden = torch.randn(n, width, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = IGNORE  # fixed-shape batches (CUDA graphs) pass untrained positions along
    chunk = logits_chunk_tokens(vocab)
    assert chunk < n and n % chunk
    targets[-chunk:] = IGNORE  # a whole chunk of them
    results = []
    for fused in (True, False):
        hidden.grad = head.weight.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = head_loss_sum(head, hidden, targets) if fused else \
                F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=IGNORE)
        (loss * 0.5).backward()  # the scale a mean (or an fp16 loss scaler) puts on the gradient
        results.append((float(loss.detach()), hidden.grad.clone(),
                        head.weight.grad.clone() if head_trained else None))
    (loss, grad, head_grad), (ref_loss, ref_grad, ref_head_grad) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert (grad - ref_grad).norm() / ref_grad.norm() < tol
    if head_trained:
        assert (head_grad - ref_head_grad).norm() / ref_head_grad.norm() < tol
    with torch.no_grad():  # evaluation: no gradient work
        assert float(head_loss_sum(head, hidden, targets)) == pytest.approx(float(
            F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=IGNORE)), rel=1e-5)
    assert not torch.isnan(grad).any() and float(grad[::7].abs().max()) == 0.0


@pytest.mark.parametrize("head_trained", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_group_sums_are_each_groups_cross_entropy_with_its_gradient(monkeypatch, head_trained, grad):
    # every row through the head, each to its group's sum: what a preference step captured as a CUDA graph runs
    torch.manual_seed(0)
    vocab, width, n, groups = 500, 16, 150, 4
    monkeypatch.setattr(loss_module, "LOGITS_CHUNK_BYTES", 32 * 4 * vocab)  # chunks of 32 rows, a ragged last
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight.requires_grad_(head_trained)
    hidden = torch.randn(n, width, requires_grad=grad)
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = IGNORE
    owners = torch.randint(0, groups, (n,))
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25])
    with torch.set_grad_enabled(grad):
        sums = head_loss_sum(head, hidden, targets, owners, groups)
        full = F.cross_entropy(head(hidden).float(), targets, reduction="none", ignore_index=IGNORE)
        expected = torch.stack([full[owners == k].sum() for k in range(groups)])
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    if grad:
        (sums * weights).sum().backward()
        got = hidden.grad.clone()
        hidden.grad = None
        (expected * weights).sum().backward()
        torch.testing.assert_close(got, hidden.grad, rtol=1e-4, atol=1e-6)
        assert float(got[::5].abs().max()) == 0.0  # unscored rows: no gradient
