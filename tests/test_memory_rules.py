"""memory_rules ties the planner to the engine: the planner's compiled-block, dense-copy, kept-dense-weight,
lean-norm and CUDA-graph decisions are the engine's for the same config, and both size the loss chunk and the MLP tile alike."""

import pytest
import torch

from conftest import tiny_config
import snugtune.loss as loss_module
from snugtune.engine import tiling
from snugtune.engine.speedups import compile_wanted, cuda_graphs_wanted, dense_copy_wanted, dense_weights_kept_in
from snugtune.memory_rules import (ATTENTION_HEAD_GROUPS, LOGITS_CHUNK_BYTES, MLP_TILE_TOKENS, leans_norms,
                                   logits_chunk_tokens, tiles_attention)
from snugtune.models.load import decoder_layers, load_base_model, prepare_for_training
from snugtune.models.resolve import resolve_model
from snugtune.planner import Offload, settings_for
from snugtune.planner.inventory import inventory_for
from snugtune.planner.memory import estimate, Part

CUDA = torch.device("cuda", 0)  # the policy only; nothing runs on it

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
def test_the_planner_decides_compilation_dense_weights_and_graphs_as_the_engine_does(tmp_path, alpaca_file,
                                                                                      change, offload):
    # dense copy: the planner's Settings after it asked for the config's (auto is its own choice, tested in
    # test_planner_choose); the engine's from the resolved config
    sections = {"method": "qlora", "lora": {"dropout": 0.0}, "train": {"grad_checkpointing": True}}
    for key, value in change.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    config = tiny_config(tmp_path, alpaca_file, **sections)
    model = prepare_for_training(load_base_model(resolve_model(config.model).path, config, torch.device("cpu"),
                                                 torch.float32), config)
    streaming = offload.weights
    compiling = compile_wanted(config, CUDA, distributed=False, streaming=streaming)
    copying = dense_copy_wanted(config, streaming=streaming, fsdp=False)
    planned = settings_for(config, inventory_for(config), 1, config.train.grad_checkpointing is True,
                           offload=offload, tiled_mlp=config.train.tiled_mlp is True,
                           dense_copy=config.quant.dense_copy is True)
    assert planned.cuda_graphs == cuda_graphs_wanted(model, config, CUDA, distributed=False, streaming=streaming)
    assert planned.dense_copy == copying
    assert planned.dense_weights_kept == bool(dense_weights_kept_in(decoder_layers(model), config, compiling,
                                                                    copying))
    # lean norms and attention by groups of heads: long rows (MLP tiling) in eager blocks (streamed weights)
    long_and_eager = config.train.tiled_mlp is True and streaming
    assert planned.lean_norms == leans_norms(config.train.tiled_mlp is True, compiling, model.config.model_type) \
        == long_and_eager
    assert planned.head_groups == (ATTENTION_HEAD_GROUPS if tiles_attention(config.train.tiled_mlp is True,
                                                                          compiling) else 1)
    assert (planned.head_groups > 1) == long_and_eager


def test_engine_and_planner_size_the_loss_chunk_and_the_mlp_tile_alike(tiny_llama_inventory):
    from conftest import planner_settings
    assert loss_module.LOGITS_CHUNK_BYTES == LOGITS_CHUNK_BYTES and tiling.MLP_TILE_TOKENS == MLP_TILE_TOKENS
    vocab = tiny_llama_inventory.vocab
    assert loss_module.logits_chunk_tokens(vocab) == logits_chunk_tokens(vocab) == LOGITS_CHUNK_BYTES // (4 * vocab)
    # the planner's frozen-head loss holds one chunk of fp32 logits and its 16-bit copy (every position trained)
    s = planner_settings(micro_batch=64, max_seq_len=2048, lora_targets=("q_proj",))
    chunk = logits_chunk_tokens(vocab)
    assert estimate(tiny_llama_inventory, s)[Part.LOSS] == chunk * vocab * 6 + 2 * 64 * 2048 * 64 * 2
