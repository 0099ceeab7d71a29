"""models/resolve.py: what a `model:` string names, the folder it becomes, and the config `plan` reads offline."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from snugtune.errors import ConfigError
from snugtune.models.resolve import offline_model_config, read_model_name, resolve_model
from snugtune.registry import HUB_IDS


def _hf_folder(folder, **config):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=777, **config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, kind, shape", [
    ("smollm2-135m-instruct", "builtin", "smollm2-135m"),
    ("shape:tiny", "shape", "tiny"),
    ("shape:llama3-8b", "shape", "llama3-8b"),
    ("shape:tiny-phi-2", "shape", "tiny-phi-2"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "hub", "tinyllama-1.1b"),
    ("someone/their-model", "hub", None),
])
def test_each_kind_of_name_is_told_apart(name, kind, shape):
    named = read_model_name(name)
    assert (named.kind, named.shape, named.source) == (kind, shape, name)


def test_a_local_folder_and_a_gguf_file_are_read_from_the_disk_first(tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path / "meta-llama" / "Llama-2-7b-hf")
    monkeypatch.chdir(tmp_path)
    # a folder named like a registry hub id is the user's folder, for training and planning alike
    assert read_model_name("meta-llama/Llama-2-7b-hf").kind == "local"
    assert offline_model_config("meta-llama/Llama-2-7b-hf").vocab_size == 777
    assert read_model_name(str(folder)).path == folder
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert read_model_name("m.gguf").kind == "gguf"


@pytest.mark.parametrize("name, message", [
    ("not-a-model", "not a built-in name"),
    ("", "not a built-in name"),
    ("shape:", "unknown shape ''"),
    ("shape:llama3-8", "did you mean 'shape:llama3-8b'"),
    ("shape:tiny-nothing-like-it-zzz", "unknown shape"),
    ("/no/such/folder", "not a built-in name"),
    ("./no/such/folder", "not a built-in name"),
    ("missing.gguf", "GGUF file not found"),
    ("~0", "no such user"),
    ("~no-such-user-here/model", "no such user"),
])
def test_names_that_name_nothing_are_one_line_errors(name, message):
    with pytest.raises(ConfigError, match=message) as caught:
        read_model_name(name)
    assert str(caught.value).startswith("model:") and "\n" not in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_string_is_named_or_refused_in_one_line(name):
    try:
        named = read_model_name(name)
    except ConfigError as exc:
        assert str(exc).startswith("model") and "\n" not in str(exc).replace(name, "")
        return
    assert named.kind in {"builtin", "shape", "gguf", "local", "hub"}
    assert (named.path is not None) == (named.kind in {"gguf", "local"})


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="pickle"):
        resolve_model(str(tmp_path))


def test_a_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_unknown_model_string_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a built-in name"):
        resolve_model("not-a-model")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_a_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ConfigError, match="hub cannot be reached .*shape:tinyllama-1.1b"):
        resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")


@pytest.mark.parametrize("name", ["shape:tiny", "shape:tiny-qwen2.5-1.5b", "shape:tiny-phi-2"])
def test_the_planner_reads_the_config_of_the_model_that_trains(name):
    from transformers import AutoConfig
    built = AutoConfig.from_pretrained(resolve_model(name).path)
    planned = offline_model_config(name)
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"]
    assert {f: getattr(planned, f) for f in fields} == {f: getattr(built, f) for f in fields}


def test_registry_hub_ids_plan_with_the_real_vocabulary_and_shapes_with_the_shared_tokenizer():
    assert offline_model_config("TinyLlama/TinyLlama-1.1B-Chat-v1.0").vocab_size == 32000
    assert offline_model_config("shape:tinyllama-1.1b").vocab_size == 49152  # grown to the shared tokenizer
    assert offline_model_config("smollm2-135m-instruct").num_hidden_layers == 30
    assert set(HUB_IDS) and all(offline_model_config(hub_id).model_type for hub_id in list(HUB_IDS)[:3])


def test_names_without_an_offline_config_say_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot plan for 'someone/their-model' offline"):
        offline_model_config("someone/their-model", cache_dir=tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="not converted or downloaded yet"):
        offline_model_config(str(tmp_path / "m.gguf"), cache_dir=tmp_path)


def test_a_hub_model_downloaded_before_plans_from_its_cached_config(tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--their-model" / "snapshots" / "0123abcd"
    _hf_folder(snapshot)  # the layout huggingface_hub's snapshot_download leaves
    (tmp_path / "hub" / "models--someone--their-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--their-model" / "refs" / "main").write_text("0123abcd")
    config = offline_model_config("someone/their-model", cache_dir=tmp_path)
    assert (config.vocab_size, config.num_hidden_layers) == (777, 3)


@pytest.mark.slow
def test_a_gguf_file_converts_once_and_again_when_it_changes(tmp_path):
    from transformers import AutoConfig
    from snugtune.export.gguf_file import write_gguf
    gguf = write_gguf(resolve_model("shape:tiny").path, tmp_path / "tiny.gguf", "f16")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="not converted or downloaded yet"):
        offline_model_config(str(gguf), cache_dir=cache)
    first = resolve_model(str(gguf), cache_dir=cache)
    assert first.kind == "gguf" and AutoConfig.from_pretrained(first.path).num_hidden_layers == 2
    assert offline_model_config(str(gguf), cache_dir=cache).to_dict() == AutoConfig.from_pretrained(first.path).to_dict()
    assert list(first.path.glob("*.safetensors")) and (first.path / "tokenizer.json").is_file()
    assert resolve_model(str(gguf), cache_dir=cache).path == first.path  # cached
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve_model(str(gguf), cache_dir=cache).path != first.path  # a changed file converts again
