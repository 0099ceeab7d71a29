import pytest
import torch

from conftest import CPU, tiny_config, tiny_model
from snugtune.errors import ConfigError
from snugtune.models import load_base_model, prepare_for_training, resolve_model


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="pickle"):
        resolve_model(str(tmp_path))


def test_unknown_model_string_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a built-in name"):
        resolve_model("not-a-model")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_embedded_default_loads_as_a_real_pretrained_llama():
    path = resolve_model("smollm2-135m-instruct").path
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_a_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ConfigError, match="hub cannot be reached .*shape:tinyllama-1.1b"):
        resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")


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
