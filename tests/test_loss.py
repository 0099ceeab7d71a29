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
