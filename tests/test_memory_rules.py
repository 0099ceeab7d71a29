"""memory_rules ties the planner to the engine: the planner decides compiled blocks, the dense copy, kept dense
weights, lean norms and CUDA graphs by its rules and the engine applies exactly those decisions; both size the
loss chunk and the MLP tile alike."""

import pytest
import torch

from conftest import tiny_config
import snugtune.loss as loss_module
from snugtune.engine import tiling
from snugtune.engine.speedups import apply_speedups
from snugtune.engine.tiling import tile_for_long_rows
from snugtune.memory_rules import (ATTENTION_HEAD_GROUPS, LOGITS_CHUNK_BYTES, MLP_TILE_TOKENS, leans_norms,
                                   logits_chunk_tokens, tiles_attention)
from snugtune.methods import METHODS
from snugtune.models.load import decoder_layers, load_base_model, prepare_for_training
from snugtune.models.resolve import resolve_model
from snugtune.planner.choose import decisions_for
from snugtune.planner.plan import Offload
from snugtune.planner.inventory import inventory_for
from snugtune.planner.memory import estimate, Part

CASES = [({}, Offload()), ({"lora": {"dropout": 0.05}}, Offload()), ({"train": {"compile": False}}, Offload()),
         ({"offload": {"activations": True}}, Offload(activations=True)),
         ({"offload": {"embeddings": True}}, Offload(embeddings=True)),
         ({"train": {"tiled_mlp": True}}, Offload()), ({"train": {"tiled_mlp": True}}, Offload(weights=True)),
         ({"train": {"grad_checkpointing": False}}, Offload()),
         ({"method": "full"}, Offload()), ({"method": "lora-8bit"}, Offload()),
         ({"quant": {"dense_copy": True}}, Offload()),
         ({"quant": {"dense_copy": True}, "offload": {"activations": True}}, Offload(activations=True)),
         ({"quant": {"dense_copy": True}, "method": "lora"}, Offload())]


@pytest.mark.parametrize("change,offload", CASES, ids=[str(c[0]) for c in CASES])
def test_the_engine_applies_the_plans_compilation_dense_weights_norms_and_graphs(tmp_path, alpaca_file, change,
                                                                                 offload):
    # the planner decides each policy by memory_rules (dense copy as asked: auto is its own choice, tested in
    # tests/planner/test_choose.py); the engine's speedups and tiling do exactly what the decisions say
    sections = {"method": "qlora", "lora": {"dropout": 0.0}, "train": {"grad_checkpointing": True}}
    for key, value in change.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    config = tiny_config(tmp_path, alpaca_file, **sections)
    planned = decisions_for(config, inventory_for(config), 1, config.train.grad_checkpointing is True,
                            offload=offload, tiled_mlp=config.train.tiled_mlp is True,
                            dense_copy=config.quant.dense_copy is True)
    streaming, four_bit = offload.weights, config.method == "qlora"
    compiling = config.train.compile is not False and not streaming  # auto compiles on a GPU, one process
    assert planned.compiled_blocks == compiling
    assert planned.dense_copy == (config.quant.dense_copy is True and four_bit and not streaming)
    assert planned.dense_weights_kept == (compiling and config.train.grad_checkpointing is True and not any(offload)
                                          and not planned.dense_copy)
    assert planned.cuda_graphs == (METHODS[config.method].replays_graphs and not streaming and not offload.activations
                                   and config.train.tiled_mlp is not True
                                   and (compiling or config.train.cuda_graphs is True))
    # lean norms and attention by groups of heads: long rows (MLP tiling) in eager blocks (streamed weights)
    long_and_eager = config.train.tiled_mlp is True and streaming
    assert planned.lean_norms == leans_norms(config.train.tiled_mlp is True, compiling, "llama") == long_and_eager
    assert planned.head_groups == (ATTENTION_HEAD_GROUPS if tiles_attention(config.train.tiled_mlp is True,
                                                                          compiling) else 1)
    assert (planned.head_groups > 1) == long_and_eager
    # the engine executes the decisions, deciding nothing
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    layers = decoder_layers(model)
    long_rows = tile_for_long_rows(model, layers, planned)
    applied = apply_speedups(model, layers, planned, torch.float32)
    assert long_rows == {"tiled_mlps": len(layers) if planned.tiled_mlp else 0,
                         "grouped_attention": len(layers) if planned.head_groups > 1 else 0,
                         "lean_norms": 2 * len(layers) + 1 if planned.lean_norms else 0}
    assert applied.compiled_blocks == (len(layers) if planned.compiled_blocks else 0)
    assert (applied.dense_copy_bytes > 0) == planned.dense_copy and applied.cuda_graphs == planned.cuda_graphs
    assert (applied.fused_lora_layers > 0) == planned.fused_lora


def test_engine_and_planner_size_the_loss_chunk_and_the_mlp_tile_alike(tiny_llama_inventory):
    from conftest import planner_decisions
    assert loss_module.LOGITS_CHUNK_BYTES == LOGITS_CHUNK_BYTES and tiling.MLP_TILE_TOKENS == MLP_TILE_TOKENS
    vocab = tiny_llama_inventory.vocab
    assert loss_module.logits_chunk_tokens(vocab) == logits_chunk_tokens(vocab) == LOGITS_CHUNK_BYTES // (4 * vocab)
    # the planner's frozen-head loss holds one chunk of fp32 logits and its 16-bit copy (every position trained)
    s = planner_decisions(micro_batch=64, max_seq_len=2048, lora_targets=("q_proj",))
    chunk = logits_chunk_tokens(vocab)
    assert estimate(tiny_llama_inventory, s)[Part.LOSS] == chunk * vocab * 6 + 2 * 64 * 2048 * 64 * 2
