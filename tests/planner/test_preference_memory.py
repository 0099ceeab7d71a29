"""planner/memory.py under the preference objectives, on the inventory of a tiny Llama checked by hand: a pair
doubles the tokens of a row, the reference pass and copy are counted, and the planner chooses the reference."""

from dataclasses import replace

from conftest import planner_decisions, tiny_config, write_jsonl, pair_rows
from snugtune.memory_rules import logits_chunk_tokens
from snugtune.planner.memory import Part, estimate, peak

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
    # the scored hidden states are gathered once more, answer by answer
    assert two[Part.LOSS] - one[Part.LOSS] == 120 * inv.hidden * C
    # a forward without gradient: one block's working set over the pair's tokens, the final hidden states, a chunk
    block = 400 * (2 * inv.hidden + 2 * inv.q_dim + 2 * inv.kv_dim + 3 * inv.intermediate) * C
    head = 400 * inv.hidden * C + min(logits_chunk_tokens(inv.vocab), 400) * inv.vocab * (4 + C)
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
    assert not lora.decisions.cuda_graphs  # memory_rules.objective_replays: sft only
    full = tiny_config(tmp_path, data, model="smollm2-135m-instruct", objective="kto", method="full", max_seq_len=512)
    roomy, tight = plan_config(full, "24GiB"), plan_config(full, "3.6GiB")
    assert roomy.decisions.reference == "copy" and Part.REFERENCE_COPY in roomy.breakdown
    assert tight.fits and tight.decisions.reference == "precomputed"
    assert tight.peak_bytes <= 0.92 * 3.6 * 2**30 < roomy.peak_bytes
