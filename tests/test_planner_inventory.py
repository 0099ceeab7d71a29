"""planner.inventory: a model's parameters counted exactly from its config, offline."""

from transformers import LlamaConfig

from snugtune.planner.inventory import inventory_from_config


def test_inventory_counts_every_parameter(tiny_llama_inventory):
    inv = tiny_llama_inventory
    # per block: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    assert inv.linear_params == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert inv.other_params == 2 * 64000 + 2 * 2 * 64 + 64  # embeddings, lm_head, 2 norms per block, final norm
    assert (inv.q_dim, inv.kv_dim, inv.heads) == (64, 32, 4)


