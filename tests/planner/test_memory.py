"""planner.memory: each component's arithmetic on a hand-checkable two-block model, and the peak."""

from dataclasses import replace

from transformers import LlamaConfig

from conftest import planner_decisions, tiny_config
from snugtune.memory_rules import MLP_TILE_TOKENS
from snugtune.planner.choose import decisions_for
from snugtune.planner.plan import Offload
from snugtune.planner.inventory import inventory_from_config
from snugtune.planner.memory import (GRAPH_POOL_FRACTION, Part, activation_bytes_per_token_layer, alive_at_peak,
                                     estimate, optimizer_bytes, peak, peak_allocated, trainable_params,
                                     weight_bytes)


def test_weight_bytes_per_method(tiny_llama_inventory):
    inv = tiny_llama_inventory
    n = inv.linear_params  # 73,728
    q4 = weight_bytes(inv, planner_decisions())
    assert q4[Part.QUANTIZED_4BIT] == int(n / 2 + n / 64 * (1 + 4 / 256))
    assert q4[Part.KEPT_WEIGHTS] == 2 * inv.other_params
    assert weight_bytes(inv, planner_decisions(double_quant=False))[Part.QUANTIZED_4BIT] == n // 2 + n // 16
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert weight_bytes(inv, planner_decisions(method="lora-8bit"))[Part.QUANTIZED_8BIT] == n + 4 * rows
    assert weight_bytes(inv, planner_decisions(method="lora"))[Part.FROZEN_WEIGHTS] == 2 * n


def test_lora_and_optimizer_bytes(tiny_llama_inventory):
    inv = tiny_llama_inventory
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # r x (in + out) for the seven
    assert trainable_params(inv, planner_decisions()) == 2 * per_block == 8192
    assert optimizer_bytes(inv, planner_decisions()) == {Part.ADAPTER_PARAMS: 4 * 8192, Part.ADAPTER_GRADS: 4 * 8192,
                                                Part.OPTIMIZER_STATE: 8 * 8192}
    assert optimizer_bytes(inv, planner_decisions(optimizer="adamw_8bit"))[Part.OPTIMIZER_STATE] == 2 * 8192
    assert trainable_params(inv, planner_decisions(lora_last_layers=1)) == per_block


def test_activations_with_and_without_checkpointing(tiny_llama_inventory):
    inv = tiny_llama_inventory
    per_token = activation_bytes_per_token_layer(inv, planner_decisions())
    # norms: 2 x fp32 copy of 64 and an fp32 rstd; attention: q, k, v (repeated to 4 heads), output 4*2*64, fp32
    # lse per head, mask bias 2 bytes x 100 positions; SwiGLU: gate, up, act(gate) 3*2*128;
    # LoRA: each linear's rank-4 output, and the 16-bit inputs they multiply: q, k and v read one, gate and up
    # one, o_proj its own (64 each), down_proj 128
    assert per_token == 2 * (4 * 64 + 4) + (4 * 2 * 64 + 4 * 4 + 2 * 100) + 3 * 2 * 128 + (7 * 8 + 3 * 2 * 64 + 2 * 128)
    # compiled blocks (tests/planner/test_compiled_saves.py traces them): 16-bit norm inputs, gate and up only,
    # o_proj multiplying attention's output itself
    compiled = activation_bytes_per_token_layer(inv, planner_decisions(compiled_blocks=True))
    assert per_token - compiled == 2 * 2 * 64 + 2 * 128 + 2 * 64
    # ... counted as eager where not traced: LoRA dropout, MLP tiling
    assert activation_bytes_per_token_layer(inv, planner_decisions(compiled_blocks=True, lora_dropout=0.05)) == \
        activation_bytes_per_token_layer(inv, planner_decisions(lora_dropout=0.05))
    # dropout keeps a 1-byte mask per adapted input; LLM.int8 layers keep their inputs (hidden x2, q, MLP)
    assert activation_bytes_per_token_layer(inv, planner_decisions(lora_dropout=0.05)) == per_token + 6 * 64 + 128
    assert activation_bytes_per_token_layer(inv, planner_decisions(method="lora-8bit")) == \
        per_token + 2 * (64 + 64 + 128) + 2 * 64
    # peft's own layers (8-bit bases) with dropout: each linear multiplies its own dropped-out copy
    assert activation_bytes_per_token_layer(inv, planner_decisions(method="lora-8bit", lora_dropout=0.05)) == \
        activation_bytes_per_token_layer(inv, planner_decisions(method="lora-8bit")) + 6 * 64 + 128 + 3 * 2 * 64
    # lean norms (eager blocks): each norm keeps its 16-bit input instead of an fp32 copy
    assert activation_bytes_per_token_layer(inv, planner_decisions(lean_norms=True)) == per_token - 2 * 2 * 64
    tokens = 2 * 100
    with_ckpt = estimate(inv, planner_decisions())
    assert with_ckpt[Part.CHECKPOINTED_INPUTS] == 2 * 64 * 2 * tokens
    # the recomputed block, the gradient beside it, and attention backward's 8 bytes per query value
    attention_backward = 8 * 64 * tokens
    assert with_ckpt[Part.RECOMPUTED_BLOCK] == per_token * tokens + 2 * 64 * 2 * tokens + attention_backward
    # attention over groups of heads (2 key/value heads here, rows of one document): half of that at a time,
    # and it keeps q, k and v (2 x 32 wide) unrepeated, no output or log-sum-exp
    unmasked = estimate(inv, planner_decisions(attention_mask=False))[Part.RECOMPUTED_BLOCK]
    grouped = estimate(inv, planner_decisions(attention_mask=False, head_groups=8))[Part.RECOMPUTED_BLOCK]
    assert unmasked - grouped == attention_backward // 2 + tokens * ((4 * 2 * 64 + 4 * 4) - 2 * (64 + 2 * 32))
    assert with_ckpt[Part.ATTENTION_MASK] == 2 * 100 * 100
    without = estimate(inv, planner_decisions(grad_checkpointing=False))
    assert without[Part.ALL_ACTIVATIONS] == 2 * per_token * tokens
    assert peak(without) > peak(with_ckpt)
    # LoRA on the last block only: nothing below it keeps activations
    last = estimate(inv, planner_decisions(grad_checkpointing=False, lora_last_layers=1))
    assert last[Part.ALL_ACTIVATIONS] == per_token * tokens
    # rows of one sample each (long documents): plain causal attention, no seq x seq mask or bias
    unmasked = estimate(inv, planner_decisions(attention_mask=False))
    assert Part.ATTENTION_MASK not in unmasked
    assert activation_bytes_per_token_layer(inv, planner_decisions(attention_mask=False)) == per_token - 2 * 100


def test_tiled_mlp_bounds_the_recomputed_block_and_costs_one_more_mlp_forward():
    big = inventory_from_config(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    long = dict(micro_batch=1, max_seq_len=4 * MLP_TILE_TOKENS, attention_mask=False)
    plain, tiled = estimate(big, planner_decisions(**long)), estimate(big, planner_decisions(**long, tiled_mlp=True))
    key = Part.RECOMPUTED_BLOCK
    assert tiled[key] < plain[key] * 0.75 and peak(tiled) < peak(plain)
    # short rows: no gain
    assert estimate(big, planner_decisions(tiled_mlp=True))[key] > estimate(big, planner_decisions())[key]


def test_compiled_recomputed_4bit_block_keeps_its_dense_weights_only_without_offload(tmp_path, alpaca_file,
                                                                                      tiny_llama_inventory):
    inv = tiny_llama_inventory
    # engine.speedups.dense_weights_kept_in: one block's dequantized LoRA-layer weights, in the compute dtype
    block = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    recomputed = Part.RECOMPUTED_BLOCK
    kept = estimate(inv, planner_decisions(dense_weights_kept=True))[recomputed]
    assert kept - estimate(inv, planner_decisions())[recomputed] == 2 * block
    assert estimate(inv, planner_decisions(method="lora", dense_weights_kept=True))[recomputed] == \
        estimate(inv, planner_decisions(method="lora"))[recomputed]  # 16-bit bases: the weight itself, nothing extra
    cfg = tiny_config(tmp_path, alpaca_file, method="qlora")
    assert decisions_for(cfg, inv, 1, True).dense_weights_kept
    assert not decisions_for(cfg, inv, 1, False).dense_weights_kept  # blocks not recomputed dequantize again
    assert not decisions_for(cfg, inv, 1, True, offload=Offload(embeddings=True)).dense_weights_kept


def test_peak_holds_only_the_largest_transient_and_its_rows_add_up_to_it(tiny_llama_inventory):
    parts = estimate(tiny_llama_inventory, planner_decisions())
    transient = max(parts[Part.RECOMPUTED_BLOCK], parts[Part.LOSS])
    overheads = (Part.RECOMPUTED_BLOCK, Part.LOSS, Part.ALLOCATOR, Part.CUDA_CONTEXT)
    persistent = sum(v for k, v in parts.items() if k not in overheads)
    assert peak_allocated(parts) == persistent + transient
    assert peak(parts) == persistent + transient + parts[Part.ALLOCATOR] + parts[Part.CUDA_CONTEXT]
    at_peak = alive_at_peak(parts)
    assert sum(at_peak.values()) == peak(parts)  # the table `plan` prints adds up to the peak it reports
    smaller = min(parts[Part.RECOMPUTED_BLOCK], parts[Part.LOSS])
    assert len(parts) - len(at_peak) == 1 and smaller not in at_peak.values()


def test_cuda_graphs_pool_is_counted_on_the_steps_working_memory(tiny_llama_inventory):
    eager = estimate(tiny_llama_inventory, planner_decisions())
    graphs = estimate(tiny_llama_inventory, planner_decisions(cuda_graphs=True))
    held = sum(eager[k] for k in (Part.QUANTIZED_4BIT, Part.KEPT_WEIGHTS, Part.ADAPTER_PARAMS, Part.ADAPTER_GRADS,
                                  Part.OPTIMIZER_STATE))
    assert graphs[Part.GRAPH_POOL] == int(GRAPH_POOL_FRACTION * (peak_allocated(eager) - held))
    assert peak(graphs) == peak(eager) + graphs[Part.GRAPH_POOL]


def test_layernorm_models_under_quantization_keep_fp32_mlp_tensors():
    from transformers import PhiConfig
    phi = inventory_from_config(PhiConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=1000))
    assert (phi.norms_per_block, phi.layer_norm, phi.gated_mlp, phi.hidden_act) == (1, True, False, "gelu_new")
    targets = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    q4 = activation_bytes_per_token_layer(phi, planner_decisions(lora_targets=targets))
    lora16 = activation_bytes_per_token_layer(phi, planner_decisions(lora_targets=targets, method="lora"))
    # gelu_new keeps 4 tensors of the 256-wide MLP: fp32 (4 bytes) behind 4-bit layers, 2 bytes otherwise
    assert q4 - lora16 == 4 * 256 * (4 - 2)


def test_each_transient_is_counted_beside_the_activations_alive_at_its_moment(tiny_llama_inventory):
    inv = tiny_llama_inventory
    # the first block recomputes, the top one kept its activations: its backward comes first (BLOCK_GRADIENTS
    # beside them), and once it is done they are freed before the first block is recomputed
    parts = estimate(inv, planner_decisions(checkpointed_layers=1, trained_tokens=10))
    kept, inputs = parts[Part.KEPT_ACTIVATIONS], parts[Part.CHECKPOINTED_INPUTS]
    held = sum(v for k, v in parts.items() if not (k.transient or k.kept_for_backward or k.overhead))
    assert peak_allocated(parts) == held + max(inputs + kept + parts[Part.BLOCK_GRADIENTS],
                                               inputs + parts[Part.RECOMPUTED_BLOCK], inputs + kept + parts[Part.LOSS])
    assert parts[Part.BLOCK_GRADIENTS] < parts[Part.RECOMPUTED_BLOCK]  # no gradient beside it to recompute
    at_peak = alive_at_peak(parts)
    assert Part.KEPT_ACTIVATIONS in at_peak and Part.RECOMPUTED_BLOCK not in at_peak
    assert sum(at_peak.values()) == peak(parts)
    # a long loss chunk with little kept: the loss's moment is the peak, with everything the forward kept
    big_vocab = replace(inv, vocab=200_000)
    loss_peak = alive_at_peak(estimate(big_vocab, planner_decisions(checkpointed_layers=1)))
    assert {Part.LOSS, Part.KEPT_ACTIVATIONS, Part.CHECKPOINTED_INPUTS} <= set(loss_peak)


def test_workspace_is_cublas_and_one_dequantized_weight_for_compiled_fused_blocks(tiny_llama_inventory):
    from snugtune.planner.memory import CUBLAS_WORKSPACES, workspace_bytes
    inv = tiny_llama_inventory
    biggest = 64 * 128
    fast = planner_decisions(compiled_blocks=True)  # fused QLoRA layers: one weight dequantized at a time
    assert workspace_bytes(inv, fast) == CUBLAS_WORKSPACES + 2 * biggest
    assert workspace_bytes(inv, replace(fast, dense_copy=True)) == CUBLAS_WORKSPACES  # nothing dequantized
    # eager blocks (and peft's layers) also allocate their ops' outputs one by one: 2 x tokens x intermediate
    assert workspace_bytes(inv, planner_decisions()) == CUBLAS_WORKSPACES + 2 * 2 * biggest + 2 * 2 * 200 * 128


def test_the_allocators_fixed_reserve_is_smaller_for_compiled_blocks(tiny_llama_inventory):
    from snugtune.planner.memory import ALLOCATOR_FIXED, ALLOCATOR_FIXED_COMPILED, allocator_fixed
    assert allocator_fixed(planner_decisions(compiled_blocks=True)) == ALLOCATOR_FIXED_COMPILED < ALLOCATOR_FIXED
    assert allocator_fixed(planner_decisions()) == ALLOCATOR_FIXED
    # LLM.int8 layers allocate int8 copies and int32 products at every call: the eager reserve
    assert allocator_fixed(planner_decisions(compiled_blocks=True, method="lora-8bit")) == ALLOCATOR_FIXED


def test_partial_checkpointing_sits_between_none_and_all(tiny_llama_inventory):
    inv = tiny_llama_inventory
    per_layer = activation_bytes_per_token_layer(inv, planner_decisions()) * 200
    inputs = 64 * 2 * 200  # one block's input: hidden x 2 bytes x tokens
    one = estimate(inv, planner_decisions(checkpointed_layers=1))
    assert one[Part.CHECKPOINTED_INPUTS] == inputs
    assert one[Part.KEPT_ACTIVATIONS] == per_layer  # the top block keeps everything
    full = estimate(inv, planner_decisions())
    assert full[Part.CHECKPOINTED_INPUTS] == 2 * inputs and Part.KEPT_ACTIVATIONS not in full
    none = estimate(inv, planner_decisions(grad_checkpointing=False))
    assert peak(full) < peak(one) < peak(none)
