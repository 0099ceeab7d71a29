"""registry.py: the model registry as literal data, kept in step with transformers configs."""

import pytest
import torch

from snugtune.errors import ConfigError
from snugtune.models import count_parameters, resolve_model
from snugtune.registry import BLOCK_LINEARS, HUB_IDS, SHAPES, shape_config, shape_names


def test_registry_holds_the_recipe_models_and_llama3():
    for name in ["codellama-7b", "phi-2", "mistral-7b", "llama2-7b", "deepseek-r1-distill-qwen-1.5b",
                 "stable-code-3b", "tinyllama-1.1b", "llama3-8b", "llama3.2-1b", "smollm2-135m"]:
        assert name in SHAPES
    assert set(HUB_IDS.values()) <= set(SHAPES)
    assert {s["model_type"] for s in SHAPES.values()} <= set(BLOCK_LINEARS)


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
