"""engine/step.py under the preference objectives: the gradient of a step does not depend on how its pairs are
split into micro-batches or laid out (packed or padded), and DPO and KTO through the step equal TRL's trainers."""

import pytest
import torch

from conftest import CPU, FP32, pair_rows, tiny_config, trainable_grads, write_jsonl
from snugtune.data.prepare import prepare_data
from snugtune.engine.step import accumulate_gradients
from snugtune.models.load import load_base_model, load_tokenizer, prepare_for_training
from snugtune.models.resolve import resolve_model
from snugtune.objectives import training_objective


def move_adapter(model) -> None:
    """Random weights for the trained LoRA B: a policy away from its reference (the adapter disabled), so every
    term has a gradient. (TRL's reference adapter, which it copies untrained, stays as it is.)"""
    for name, p in model.named_parameters():
        if "lora_B" in name and p.requires_grad:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def preference_model(tmp_path, objective: str, moved: bool = True, **sections):
    """(the objective with its settings, a shape:tiny LoRA model in fp32 on the CPU, its adapter moved unless
    asked not to, tokenizer, prepared data)."""
    data_file = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    cfg = tiny_config(tmp_path, data_file, objective=objective, **sections)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, 0, objective=objective)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(path, cfg, CPU, torch.float32), cfg)
    if moved:
        move_adapter(model)
    return training_objective(cfg), model, tokenizer, data


def step(t, model, tokenizer, rows, split: list[int], packed: bool):
    """One step over `rows` in micro-batches of the sizes in `split`: (loss, metrics' means, LoRA gradients)."""
    from snugtune.preference_loss import metric_means
    model.zero_grad(set_to_none=True)
    group, at = [], 0
    for size in split:
        group.append(t.collate([[e] for e in rows[at:at + size]], tokenizer.pad_token_id, packed))
        at += size
    metrics = {}
    loss = accumulate_gradients(model, group, FP32, FP32.grad_scaler(), CPU, objective=t, metrics=metrics)
    return loss, metric_means(metrics), trainable_grads(model)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_any_split_of_a_steps_examples_and_either_layout_gives_the_same_gradient(tmp_path, objective):
    t, model, tokenizer, data = preference_model(tmp_path, objective)
    rows = data.train[:6]
    whole = step(t, model, tokenizer, rows, [6], packed=False)
    for split, packed in (([1, 3, 2], False), ([2, 2, 2], True), ([1] * 6, True)):
        loss, metrics, grads = step(t, model, tokenizer, rows, split, packed)
        assert loss == pytest.approx(whole[0], rel=1e-5), split
        for name, value in whole[1].items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, name)
        for name, grad in whole[2].items():
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), (split, name)
    assert any(g.abs().sum() > 0 for g in whole[2].values())


def test_the_first_dpo_step_sits_at_log_2_with_the_adapter_as_its_own_reference(tmp_path):
    # a fresh adapter (B = 0): policy = reference, so every pair's loss is log 2 and the rewards are 0 (to
    # rounding: the policy's forward with gradient sums its log-probabilities in another order than the
    # reference's without, so which of two equal rewards is larger is noise, as docs/preference.md says)
    t, model, tokenizer, data = preference_model(tmp_path, "dpo")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.zero_()
    loss, metrics, _ = step(t, model, tokenizer, data.train[:4], [2, 2], packed=True)
    assert loss == pytest.approx(0.6931471805599453, rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def _trl_args(config_class, tmp_path, **fields):
    return config_class(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                        per_device_train_batch_size=4, **fields)


def _assert_same(ours_loss, ours_metrics, ours_grads, trl_loss, trl_metrics, trl_grads):
    assert ours_loss == pytest.approx(float(trl_loss.detach()), rel=1e-5)
    assert ours_grads.keys() == trl_grads.keys() and ours_grads
    for name, grad in trl_grads.items():
        assert float((ours_grads[name] - grad).norm()) <= 1e-4 * float(grad.norm()) + 1e-9, name
    for name, value in ours_metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def conversational(row: dict) -> dict:
    """A TRL row of text as TRL's conversational form (which TRL renders with the chat template, as we do)."""
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return {k: turn("user" if k == "prompt" else "assistant", v) if isinstance(v, str) else v for k, v in row.items()}


@pytest.mark.slow
@pytest.mark.parametrize("split", [[4], [1, 3]])
def test_a_dpo_step_through_the_engine_equals_trls_dpo_trainer(tmp_path, split):
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from snugtune.data.preference_rows import to_pair
    from snugtune.data.preference_tokenize import tokenize_pair
    from snugtune.data.rows import Row
    t, model, tokenizer, _ = preference_model(tmp_path, "dpo", moved=False)
    raw = [conversational(r) for r in pair_rows(4, seed=1)]
    rows = [tokenize_pair(to_pair(Row(f"r:{i}", r)), tokenizer, "r") for i, r in enumerate(raw)]
    # TRL keeps the adapter as handed over (B = 0: the base) as its reference adapter; then the policy moves
    trainer = DPOTrainer(model=model, args=_trl_args(DPOConfig, tmp_path, max_length=96),
                         train_dataset=Dataset.from_list(raw), processing_class=tokenizer)
    move_adapter(model)
    ours = step(t, model, tokenizer, rows, split, packed=True)
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, trainer.data_collator(list(trainer.train_dataset)))
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    _assert_same(*ours, loss, metrics, trainable_grads(model))


@pytest.mark.slow
def test_a_kto_step_through_the_engine_equals_trls_kto_trainer(tmp_path):
    # one micro-batch of four rows: TRL's reference point over its batch is ours over the step
    from datasets import Dataset
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer
    from snugtune.data.preference_tokenize import kl_partners
    from snugtune.data.preference_rows import to_labelled
    from snugtune.data.preference_tokenize import tokenize_labelled
    from snugtune.data.rows import Row
    t, model, tokenizer, _ = preference_model(tmp_path, "kto", moved=False)
    raw = [conversational({"prompt": r["prompt"], "completion": r["chosen" if i < 2 else "rejected"], "label": i < 2})
           for i, r in enumerate(pair_rows(4, seed=1))]
    rows = kl_partners([tokenize_labelled(to_labelled(Row(f"r:{i}", r)), tokenizer, "r") for i, r in enumerate(raw)], 96)
    trainer = KTOTrainer(model=model, args=_trl_args(KTOConfig, tmp_path, max_length=96),
                         train_dataset=Dataset.from_list(raw), processing_class=tokenizer)
    move_adapter(model)
    ours = step(t, model, tokenizer, rows, [4], packed=False)
    model.zero_grad(set_to_none=True)
    batch = trainer.data_collator(list(trainer.train_dataset))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    _assert_same(*ours, loss, metrics, trainable_grads(model))
