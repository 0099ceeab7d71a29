"""models/load.py: the base loaded as its method stores it, LoRA attached, checkpointing set up."""

import pytest
import torch

from conftest import CPU, tiny_config, tiny_model
from snugtune.errors import ConfigError
from snugtune.memory_rules import config_draws_random_numbers
from snugtune.models.load import count_parameters, decoder_layers, load_base_model, prepare_for_training
from snugtune.models.resolve import resolve_model


def test_quantized_methods_keep_real_quantized_layers_and_unupcast_frozen_weights(tmp_path, alpaca_file):
    import bitsandbytes as bnb
    _, model, _, _ = tiny_model(tmp_path, alpaca_file, method="qlora")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.dtype == torch.uint8 for m in linear4)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear4)
    _, model8, _, _ = tiny_model(tmp_path, alpaca_file, method="lora-8bit")
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


@pytest.mark.parametrize("method, dropout, preserved", [("lora", 0.0, False), ("freeze", 0.0, False),
                                                        ("freeze", 0.1, True), ("full", 0.1, True)])
def test_checkpointed_blocks_save_the_generator_only_where_the_model_draws_random_numbers(
        tmp_path, alpaca_file, method, dropout, preserved):
    cfg = tiny_config(tmp_path, alpaca_file, method=method, lora={"dropout": 0.1},
                      freeze={"trainable_layers": 1}, train={"grad_checkpointing": True})
    base = load_base_model(resolve_model(cfg.model).path, cfg, CPU, torch.float32)
    base.config.attention_dropout = dropout
    model = prepare_for_training(base, cfg)
    assert config_draws_random_numbers(model.config) is preserved  # LoRA dropout's masks come from a seeded hash
    keywords = {layer._gradient_checkpointing_func.keywords["preserve_rng_state"] for layer in decoder_layers(model)}
    assert keywords == {preserved}


def test_lora_targets_and_layer_counts_are_checked_against_the_model(tmp_path, alpaca_file):
    path = resolve_model("shape:tiny").path
    for sections, message in [({"lora": {"targets": ["q_proj", "fc1"]}}, r"\['fc1'\] not found in llama"),
                              ({"lora": {"last_layers": 3}}, "last_layers=3 but the model has 2 blocks"),
                              ({"method": "freeze", "freeze": {"trainable_layers": 5}}, "trainable_layers=5")]:
        cfg = tiny_config(tmp_path, alpaca_file, **sections)
        with pytest.raises(ConfigError, match=message):
            prepare_for_training(load_base_model(path, cfg, CPU, torch.float32), cfg)


def test_last_layers_and_freeze_train_only_the_top_blocks(tmp_path, alpaca_file):
    _, lora, _, _ = tiny_model(tmp_path, alpaca_file, lora={"last_layers": 1})
    assert {n.split(".layers.")[1].split(".")[0] for n, p in lora.named_parameters() if p.requires_grad} == {"1"}
    _, frozen, _, _ = tiny_model(tmp_path, alpaca_file, method="freeze", freeze={"trainable_layers": 1})
    trainable, total = count_parameters(frozen)
    assert trainable == sum(p.numel() for p in decoder_layers(frozen)[1].parameters()) and 0 < trainable < total
