"""The engine on shape:tiny: every method learns, accumulation is exact, checkpointed LoRA gets gradients."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
import snugtune.loss as loss_module
import snugtune.planner.memory as memory
from snugtune.data import collate, prepare_data
from snugtune.data.tokenize import IGNORE
from snugtune.loss import head_loss_sum, logits_chunk_tokens
from snugtune.engine.optim import build_optimizer, flatten_trainable, lr_factor
from snugtune.precision import Precision
from snugtune.engine.step import accumulate_gradients
from snugtune.models import load_base_model, load_tokenizer, prepare_for_training, resolve_model

FP32 = Precision("fp32", "cpu")
CPU = torch.device("cpu")


def _setup(tmp_path, data_file, **sections):
    cfg = tiny_config(tmp_path, data_file, **sections)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, 0)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(path, cfg, CPU, torch.float32), cfg)
    return cfg, model, tokenizer, data


@pytest.mark.parametrize("method", ["lora", "qlora", "lora-8bit", "freeze", "full"])
def test_each_method_lowers_the_loss_on_a_fixed_batch(tmp_path, alpaca_file, method):
    cfg, model, tokenizer, data = _setup(tmp_path, alpaca_file, method=method, freeze={"trainable_layers": 1})
    batch = collate(data.train[:8], tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train, CPU)
    scaler = FP32.grad_scaler()
    losses = []
    for _ in range(6):
        losses.append(accumulate_gradients(model, [batch], FP32, scaler, CPU))
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses


def test_quantized_methods_keep_real_quantized_layers_and_unupcast_frozen_weights(tmp_path, alpaca_file):
    import bitsandbytes as bnb
    _, model, _, _ = _setup(tmp_path, alpaca_file, method="qlora")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.dtype == torch.uint8 for m in linear4)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    _, model8, _, _ = _setup(tmp_path, alpaca_file, method="lora-8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in model8.modules())
    # trainable parameters are exactly the LoRA matrices
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_weights_stay_in_the_compute_dtype(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, method="qlora")
    path = resolve_model(cfg.model).path
    model = prepare_for_training(load_base_model(path, cfg, CPU, torch.bfloat16), cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}  # embeddings, norms, lm_head: no fp32 up-cast
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_8x1_equals_1x8_on_ragged_data(tmp_path, alpaca_file):
    cfg, model, tokenizer, data = _setup(tmp_path, alpaca_file, lora={"dropout": 0.0})
    samples = data.train[:8]
    assert len({len(s.input_ids) for s in samples}) > 1  # really ragged
    scaler = FP32.grad_scaler()
    one_batch = accumulate_gradients(model, [collate(samples, tokenizer.pad_token_id)], FP32, scaler, CPU)
    together = _grads(model)
    model.zero_grad(set_to_none=True)
    eight = accumulate_gradients(model, [collate([s], tokenizer.pad_token_id) for s in samples], FP32, scaler, CPU)
    apart = _grads(model)
    assert abs(one_batch - eight) < 1e-5
    for name in together:
        assert torch.allclose(together[name], apart[name], atol=1e-5, rtol=1e-4), name


def test_every_lora_b_gets_a_gradient_at_step_one_with_checkpointing(tmp_path, alpaca_file):
    cfg, model, tokenizer, data = _setup(tmp_path, alpaca_file, train={"grad_checkpointing": True})
    assert model.get_base_model().model.gradient_checkpointing
    accumulate_gradients(model, [collate(data.train[:4], tokenizer.pad_token_id)], FP32, FP32.grad_scaler(), CPU)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 7  # two blocks x seven projections
    for name, p in lora_b.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("checkpoint_layers", [None, 1, 0])
def test_partial_checkpointing_gives_the_same_gradients(tmp_path, alpaca_file, checkpoint_layers):
    # None: every block recomputes; 1: only the first; 0: none (all keep their activations)
    batch_of = lambda data, tok: collate(data.train[:4], tok.pad_token_id)  # noqa: E731
    _, plain, tokenizer, data = _setup(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                       train={"grad_checkpointing": False})
    accumulate_gradients(plain, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU)
    _, model, _, _ = _setup(tmp_path, alpaca_file, lora={"dropout": 0.0},
                            train={"grad_checkpointing": True, "checkpoint_layers": checkpoint_layers})
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    assert flags == {None: [True, True], 1: [True, False], 0: [False, False]}[checkpoint_layers]
    accumulate_gradients(model, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU)
    expected = _grads(plain)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-5), name


def test_one_flat_optimizer_tensor_trains_exactly_like_one_tensor_per_matrix(tmp_path, alpaca_file):
    batch_of = lambda data, tok, k: collate(data.train[4 * k:4 * k + 4], tok.pad_token_id)  # noqa: E731
    weights = {}
    for flat in (False, True):
        cfg, model, tokenizer, data = _setup(tmp_path, alpaca_file, lora={"dropout": 0.0}, train={"optimizer": "adamw"})
        params = [p for p in model.parameters() if p.requires_grad]
        stepped = [flatten_trainable(params)] if flat else params
        optimizer = build_optimizer(stepped, cfg.train, CPU)
        for k in range(3):
            accumulate_gradients(model, [batch_of(data, tokenizer, k)], FP32, FP32.grad_scaler(), CPU)
            torch.nn.utils.clip_grad_norm_(stepped, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in params)  # zeroed in place, views kept
        weights[flat] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert weights[True].keys() == weights[False].keys()
    assert all(value.any() for name, value in weights[True].items() if "lora_B" in name)  # B left zero: it trained
    for name, value in weights[False].items():
        assert torch.allclose(weights[True][name], value, atol=1e-6, rtol=1e-5), name


def test_tiled_mlps_give_the_same_gradients_and_keep_the_planners_tile(tmp_path, alpaca_file):
    from snugtune.engine.tiling import MLP_TILE_TOKENS, tile_mlps
    from snugtune.planner import memory
    assert memory.MLP_TILE_TOKENS == MLP_TILE_TOKENS  # the planner sizes the tile the engine runs
    batch_of = lambda data, tok: collate(data.train[:4], tok.pad_token_id)  # noqa: E731
    grads, losses = [], []
    for tile in (None, 16):  # 16 tokens: every MLP call of the batch runs in several tiles, the last ragged
        # no dropout: tiles draw their masks tile by tile, a different (equally valid) draw
        _, model, tokenizer, data = _setup(tmp_path, alpaca_file, lora={"dropout": 0.0},
                                           train={"grad_checkpointing": True})
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the MLP's LoRA a part in the loss
                torch.nn.init.normal_(p, std=0.1)
        if tile:
            assert tile_mlps(model.get_base_model().model.layers, tile) == 2
        torch.manual_seed(3)
        losses.append(accumulate_gradients(model, [batch_of(data, tokenizer)], FP32, FP32.grad_scaler(), CPU))
        grads.append(_grads(model))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-5), name


def test_warmup_then_cosine_schedule():
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05
    assert [lr_factor(s, 10, 0, "constant") for s in (0, 9)] == [1.0, 1.0]
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_trained", [False, True])
def test_chunked_loss_matches_full_logits_cross_entropy(monkeypatch, dtype, head_trained):
    # a frozen head takes the gradient-in-forward path, a trained one the recomputing path; both against
    # one cross-entropy over the full logits, with several chunks and a ragged last one
    torch.manual_seed(0)
    vocab, width, n, chunk_rows = 1000, 32, 300, 64
    assert memory.LOSS_CHUNK_BYTES == loss_module.LOGITS_CHUNK_BYTES  # the planner sizes the chunk the engine runs
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
