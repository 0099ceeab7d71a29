"""models/embedded.py and gguf_convert.py: the embedded default, a real SmolLM2 converted from its GGUF."""

from snugtune.models.cache import default_cache_dir
from snugtune.models.embedded import EMBEDDED_DEFAULT, embedded_model_dir, embedded_tokenizer_dir
from snugtune.models.gguf_convert import CONVERTED_MARKER, is_converted
from snugtune.models.resolve import resolve_model


def test_embedded_default_loads_as_a_real_pretrained_llama():
    path = resolve_model("smollm2-135m-instruct").path
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_the_conversion_is_cached_and_the_tokenizer_kept_without_weights():
    path = embedded_model_dir(default_cache_dir())
    assert path.name == EMBEDDED_DEFAULT and is_converted(path) and (path / CONVERTED_MARKER).is_file()
    stamp = (path / CONVERTED_MARKER).stat().st_mtime_ns
    assert embedded_model_dir(default_cache_dir()) == path and (path / CONVERTED_MARKER).stat().st_mtime_ns == stamp
    tokenizer_dir = embedded_tokenizer_dir(default_cache_dir())
    assert (tokenizer_dir / "tokenizer.json").is_file() and not list(tokenizer_dir.glob("*.safetensors"))
