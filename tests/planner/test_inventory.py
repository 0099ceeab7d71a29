"""planner.inventory: a model's parameters counted exactly from its config, offline."""

import pytest
from transformers import LlamaConfig

from conftest import tiny_config
from snugtune.errors import ConfigError
from snugtune.planner.inventory import inventory_for, inventory_from_config


def test_inventory_counts_every_parameter(tiny_llama_inventory):
    inv = tiny_llama_inventory
    # per block: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    assert inv.linear_params == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert inv.other_params == 2 * 64000 + 2 * 2 * 64 + 64  # embeddings, lm_head, 2 norms per block, final norm
    assert (inv.q_dim, inv.kv_dim, inv.heads) == (64, 32, 4)




def test_dropout_in_the_models_config_is_seen_and_shapes_plan_offline(tmp_path, alpaca_file):
    dropout = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=1000, attention_dropout=0.1)
    assert inventory_from_config(dropout).draws_random_numbers  # such blocks cannot replay as CUDA graphs
    eight = inventory_for(tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b"))
    assert (eight.layers, eight.hidden, eight.vocab) == (32, 4096, 128256) and not eight.draws_random_numbers
    with pytest.raises(ConfigError, match="unknown shape 'nope'"):
        inventory_for(tiny_config(tmp_path, alpaca_file, model="shape:nope"))
