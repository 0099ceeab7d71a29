"""registry.py: the model registry and the model families as literal data, kept in step with transformers
(its configs and classes) and llama.cpp (its architectures)."""

import pytest
import torch

from snugtune.errors import ConfigError
from snugtune.models.load import count_parameters
from snugtune.models.resolve import resolve_model
from snugtune.registry import FAMILIES, HUB_IDS, SHAPES, block_linear_names, shape_config, shape_names


def test_registry_holds_the_recipe_models_and_llama3():
    for name in ["codellama-7b", "phi-2", "mistral-7b", "llama2-7b", "deepseek-r1-distill-qwen-1.5b",
                 "stable-code-3b", "tinyllama-1.1b", "llama3-8b", "llama3.2-1b", "smollm2-135m"]:
        assert name in SHAPES
    assert set(HUB_IDS.values()) <= set(SHAPES)
    assert {s["model_type"] for s in SHAPES.values()} <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_builds_a_transformers_config_with_the_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(shape_config(name))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    published = {"llama3-8b": 8.03, "llama2-7b": 6.74, "codellama-7b": 6.74, "mistral-7b": 7.24,
                 "tinyllama-1.1b": 1.10, "phi-2": 2.78, "stable-code-3b": 2.80, "qwen2.5-7b": 7.62,
                 "deepseek-r1-distill-qwen-1.5b": 1.78, "qwen2.5-1.5b": 1.54, "llama3.2-1b": 1.24,
                 "llama3.2-3b": 3.21, "gemma-7b": 8.54, "smollm2-135m": 0.135}
    if name in published:
        assert billions == pytest.approx(published[name], rel=0.03)


def test_tiny_shapes_are_small_and_exist_for_each_family():
    assert "tiny-phi-2" in shape_names() and "tiny-stable-code-3b" in shape_names()
    model_dir = resolve_model("shape:tiny").path
    from transformers import AutoModelForCausalLM
    _, total = count_parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    assert total < 5_000_000


def test_unknown_shape_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'shape:llama3-8b'"):
        resolve_model("shape:llama3-8")


def _small_model_of(model_type: str):
    """A two-block model of the family on the meta device (no memory), from the family's own config class."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_lists_every_linear_layer_of_its_blocks(model_type):
    block = _small_model_of(model_type).model.layers[0]
    linears = {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(FAMILIES[model_type].block_linears) == linears
    assert block_linear_names(model_type) == list(FAMILIES[model_type].block_linears)


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.lean_norm))
def test_each_lean_norm_is_the_rms_norm_class_the_family_uses(model_type):
    classes = {type(m).__name__ for m in _small_model_of(model_type).modules()}
    assert FAMILIES[model_type].lean_norm in classes and FAMILIES[model_type].lean_norm.endswith("RMSNorm")


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.mlp_norm))
def test_each_mlp_norm_is_the_norm_whose_output_only_the_mlp_reads(model_type):
    import inspect
    block = _small_model_of(model_type).model.layers[0]
    norm = FAMILIES[model_type].mlp_norm
    assert isinstance(getattr(block, norm), torch.nn.Module)
    source = inspect.getsource(type(block).forward)  # engine.tiling moves the norm into the MLP's tiles
    lines = [line.strip() for line in source.splitlines()]
    at = lines.index(f"hidden_states = self.{norm}(hidden_states)")
    assert lines[at + 1] == "hidden_states = self.mlp(hidden_states)"
    assert source.count(f"self.{norm}") == 1


def test_gguf_architectures_are_ones_llama_cpp_knows_and_the_writer_claims_only_families():
    import gguf
    from snugtune.export.gguf_file import ARCHES
    known = set(gguf.MODEL_ARCH_NAMES.values())
    assert {f.gguf_arch for f in FAMILIES.values() if f.gguf_arch} <= known
    assert set(ARCHES) <= set(FAMILIES) and set(ARCHES) == {t for t, f in FAMILIES.items() if f.gguf_arch}
    assert all(FAMILIES[t].gguf_arch for t, f in FAMILIES.items() if f.gguf_pre_tokenizer)


def test_a_family_not_listed_takes_llama_block_names():
    names = block_linear_names("some-new-family")
    assert names == list(FAMILIES["llama"].block_linears)
    names.append("changed")  # a fresh list each call: the table stays as written
    assert "changed" not in block_linear_names("some-new-family")
