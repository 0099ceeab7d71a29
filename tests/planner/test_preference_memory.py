"""planner/memory.py under the preference objectives, on the inventory of a tiny Llama checked by hand: a pair
doubles the tokens of a row, the reference pass and copy are counted, and the planner chooses the reference."""

from dataclasses import replace

import pytest
import torch

from conftest import planner_decisions, tiny_config, write_jsonl, pair_rows
from snugtune.memory_rules import logits_chunk_tokens
from snugtune.planner.memory import Part, alive_at_peak, estimate, peak, peak_allocated

C = 2  # bytes of a 16-bit value


def test_a_pair_doubles_the_activations_and_adds_the_reference_pass(tiny_llama_inventory):
    inv = tiny_llama_inventory
    sft = planner_decisions(grad_checkpointing=False, trained_tokens=120, attention_mask=False)
    dpo = replace(sft, objective="dpo", reference="adapter")
    one, two = estimate(inv, sft), estimate(inv, dpo)
    assert dpo.tokens == 2 * sft.tokens == 400
    masked = estimate(inv, replace(dpo, attention_mask=True))  # a packed pair: one row of twice the length
    assert masked[Part.ATTENTION_MASK] == 4 * estimate(inv, replace(sft, attention_mask=True))[Part.ATTENTION_MASK]
    assert two[Part.ALL_ACTIVATIONS] == 2 * one[Part.ALL_ACTIVATIONS]
    assert two[Part.BLOCK_GRADIENTS] == 2 * one[Part.BLOCK_GRADIENTS]
    # the head runs answer by answer (an answer has at most max_seq_len positions), and the scored hidden
    # states are gathered once more
    chunk = min(logits_chunk_tokens(inv.vocab), 120)
    assert one[Part.LOSS] == chunk * inv.vocab * (4 + C) + 2 * 120 * inv.hidden * C
    assert two[Part.LOSS] == 100 * inv.vocab * (4 + C) + 3 * 120 * inv.hidden * C
    # a forward without gradient: one block's working set over the pair's tokens, the final hidden states, an
    # answer's chunk of fp32 logits and their log-softmax
    block = 400 * (2 * inv.hidden + 2 * inv.q_dim + 2 * inv.kv_dim + 3 * inv.intermediate) * C
    head = 400 * inv.hidden * C + 100 * inv.vocab * (4 + 4)
    assert two[Part.REFERENCE_PASS] == block + head and Part.REFERENCE_PASS not in one
    assert peak(two) > peak(one)
    for part in (Part.QUANTIZED_4BIT, Part.ADAPTER_PARAMS, Part.OPTIMIZER_STATE):  # what is held does not change
        assert two[part] == one[part]


def test_orpo_has_no_reference_kto_one_sequence_a_row_and_a_full_copy_is_the_whole_model(tiny_llama_inventory):
    inv = tiny_llama_inventory
    sft = planner_decisions(grad_checkpointing=True)
    orpo = estimate(inv, replace(sft, objective="orpo"))
    assert Part.REFERENCE_PASS not in orpo and orpo[Part.CHECKPOINTED_INPUTS] == 2 * estimate(inv, sft)[
        Part.CHECKPOINTED_INPUTS]
    kto = estimate(inv, replace(sft, objective="kto", reference="adapter"))  # its mismatched rows: no gradient
    assert kto[Part.CHECKPOINTED_INPUTS] == estimate(inv, sft)[Part.CHECKPOINTED_INPUTS] and Part.REFERENCE_PASS in kto
    full = replace(sft, method="full", objective="dpo")
    copy, precomputed = estimate(inv, replace(full, reference="copy")), estimate(inv, replace(full, reference="precomputed"))
    assert copy[Part.REFERENCE_COPY] == C * inv.total_params and Part.REFERENCE_COPY not in precomputed
    assert Part.REFERENCE_PASS not in precomputed  # read from the batch: no forward


def test_the_planner_plans_preference_runs_and_holds_a_copy_only_where_it_fits(tmp_path):
    from snugtune.planner.choose import plan_config
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    lora = plan_config(tiny_config(tmp_path, data, model="smollm2-135m-instruct", objective="dpo",
                                   max_seq_len=1024), "t4")
    assert lora.fits and lora.decisions.reference == "adapter" and lora.decisions.objective == "dpo"
    assert lora.decisions.cuda_graphs  # a DPO step with the adapter as its reference replays as a CUDA graph
    full = tiny_config(tmp_path, data, model="smollm2-135m-instruct", objective="kto", method="full", max_seq_len=512)
    roomy, tight = plan_config(full, "24GiB"), plan_config(full, "3.6GiB")
    assert roomy.decisions.reference == "copy" and Part.REFERENCE_COPY in roomy.breakdown
    assert tight.fits and tight.decisions.reference == "precomputed"
    assert tight.peak_bytes <= 0.92 * 3.6 * 2**30 < roomy.peak_bytes


def test_the_reference_pass_is_counted_beside_what_is_held_not_beside_the_activations(tiny_llama_inventory):
    inv = tiny_llama_inventory
    dpo = planner_decisions(grad_checkpointing=False, objective="dpo", reference="adapter", attention_mask=False)
    parts = estimate(inv, dpo)
    held = sum(v for k, v in parts.items() if not (k.transient or k.kept_for_backward or k.overhead))
    others = max(parts[k] for k in (Part.LOSS, Part.BLOCK_GRADIENTS))
    assert peak_allocated(parts) == held + max(parts[Part.ALL_ACTIVATIONS] + others, parts[Part.REFERENCE_PASS])
    # where it is the largest moment (a long vocabulary, little kept), the table shows it without activations
    wide = estimate(replace(inv, vocab=400_000), replace(dpo, grad_checkpointing=True))
    at_peak = alive_at_peak(wide)
    assert Part.REFERENCE_PASS in at_peak and Part.CHECKPOINTED_INPUTS not in at_peak
    assert sum(at_peak.values()) == peak(wide)


def test_a_trained_head_holds_its_16bit_cast_and_that_casts_gradient_in_the_loss(tiny_llama_inventory):
    inv = tiny_llama_inventory
    full = planner_decisions(method="full", trained_tokens=50)
    chunk = min(logits_chunk_tokens(inv.vocab), 50)
    head = 2 * C * inv.vocab * inv.hidden
    assert estimate(inv, full)[Part.LOSS] == chunk * inv.vocab * (C + 4 + 4) + head + 50 * inv.hidden * (C + 4)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_the_reference_pass_runs_before_the_step_keeps_anything_for_backward(tmp_path, objective):
    """What the planner's reference moment rests on: the step runs each reference forward (and KTO's pass over
    its mismatched rows) before the policy's forward has saved a tensor for backward."""
    from conftest import CPU, FP32
    from snugtune.data.prepare import prepare_data
    from snugtune.engine.step import accumulate_gradients
    from snugtune.models.load import load_base_model, load_tokenizer, prepare_for_training
    from snugtune.models.resolve import resolve_model
    from snugtune.objectives import training_objective
    cfg = tiny_config(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8)), objective=objective)
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, 0, objective=objective)
    model = prepare_for_training(load_base_model(path, cfg, CPU, torch.float32), cfg)
    t = training_objective(cfg)
    saved, at_reference = [0], []
    disable = model.disable_adapter

    def recording():
        at_reference.append(saved[0])
        return disable()
    model.disable_adapter = recording

    def pack(tensor):
        saved[0] += 1
        return tensor
    batch = t.collate([[e] for e in data.train[:4]], tokenizer.pad_token_id, True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        accumulate_gradients(model, [batch], FP32, FP32.grad_scaler(), CPU, objective=t)
    assert at_reference and set(at_reference) == {0} and saved[0] > 0


def test_a_preference_graphs_pool_is_a_small_reserve_unless_lengths_vary(tiny_llama_inventory):
    # one shape: the pool holds the step's working memory in place of the allocator (2026-12-07 grid); several
    # lengths: a shape not captured runs eagerly beside the pool, its working memory once more
    from snugtune.planner.memory import PREFERENCE_GRAPH_POOL_FIXED
    inv = tiny_llama_inventory
    dpo = planner_decisions(objective="dpo", reference="adapter", cuda_graphs=True)
    one_shape, varied = estimate(inv, dpo), estimate(inv, replace(dpo, lengths_vary=True))
    working = one_shape[Part.GRAPH_POOL] - PREFERENCE_GRAPH_POOL_FIXED
    assert 0 < working < 0.1 * one_shape[Part.GRAPH_POOL]
    assert varied[Part.GRAPH_POOL] > one_shape[Part.GRAPH_POOL] + 10 * working
    assert peak(varied) > peak(one_shape)
    sft = planner_decisions(cuda_graphs=True)
    assert estimate(inv, replace(sft, lengths_vary=True)) == estimate(inv, sft)  # sft's pool: its own rule


def test_an_epochs_short_last_micro_batch_counts_its_share_of_the_working_memory_beside_the_pool(
        tiny_llama_inventory):
    # its shape runs eagerly beside the captured one's pool: the bench's DPO TinyLlama recipe, 23 pairs in 2-pair
    # micro-batches, reserved 3.76 GiB beyond its allocated peak (H100, 2026-12-07)
    inv = tiny_llama_inventory
    dpo = planner_decisions(objective="dpo", reference="adapter", cuda_graphs=True)
    full, half = estimate(inv, dpo), estimate(inv, replace(dpo, tail_share=0.5))
    varied = estimate(inv, replace(dpo, lengths_vary=True))
    beside = varied[Part.GRAPH_POOL] - full[Part.GRAPH_POOL]  # a whole micro-batch's working memory
    assert half[Part.GRAPH_POOL] - full[Part.GRAPH_POOL] == pytest.approx(beside / 2, abs=1)
    assert estimate(inv, replace(dpo, tail_share=0.5, lengths_vary=True)) == varied  # counted once
    sft = planner_decisions(cuda_graphs=True)
    assert estimate(inv, replace(sft, tail_share=0.5)) == estimate(inv, sft)  # sft's pool: its own rule
