"""models/shapes.py: random-weight models of a registry shape, built once, holding the shared tokenizer."""

import pytest

from snugtune.models.cache import default_cache_dir
from snugtune.models.embedded import embedded_tokenizer_dir
from snugtune.models.shapes import SHAPE_MARKER, build_shape_model, shape_transformers_config
from snugtune.registry import SHAPE_TOKENIZER_VOCAB, SHAPES


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_shape_grows_only_to_hold_the_shared_tokenizer(shape):
    published = SHAPES[shape]["vocab_size"]
    assert shape_transformers_config(shape).vocab_size == published
    grown = shape_transformers_config(shape, SHAPE_TOKENIZER_VOCAB).vocab_size
    assert grown == max(published, SHAPE_TOKENIZER_VOCAB)
    assert shape_transformers_config(shape).model_type == SHAPES[shape]["model_type"]


def test_the_shared_tokenizer_has_the_vocabulary_the_planner_assumes():
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(embedded_tokenizer_dir(default_cache_dir()))) == SHAPE_TOKENIZER_VOCAB


def test_a_shape_model_is_built_once_with_the_shared_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    cache = tmp_path / "cache"
    (cache / "tokenizers").mkdir(parents=True)  # the shared tokenizer from the usual cache, not converted again
    (cache / "tokenizers" / "smollm2-135m-instruct").symlink_to(embedded_tokenizer_dir(default_cache_dir()))
    path = build_shape_model("tiny-mistral-7b", cache)
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.model_type == "mistral" and config.vocab_size == len(tokenizer) == SHAPE_TOKENIZER_VOCAB
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    marker = (path / SHAPE_MARKER).stat().st_mtime_ns
    assert build_shape_model("tiny-mistral-7b", cache) == path and (path / SHAPE_MARKER).stat().st_mtime_ns == marker
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind


def test_an_unknown_shape_is_a_key_error():
    with pytest.raises(KeyError):
        shape_transformers_config("no-such-shape")
