import typing

import pytest

from snugtune.config import Config
from snugtune.methods import ADAPTER_METHODS, METHODS


def test_the_config_accepts_exactly_the_methods_in_the_table():
    assert set(typing.get_args(Config.model_fields["method"].annotation)) == set(METHODS)
    assert all(name == row.name for name, row in METHODS.items())


def test_quantized_methods_imply_their_bits_and_adapter_methods_use_lora():
    assert {m.name: m.base_bits for m in METHODS.values() if m.base_bits} == {"qlora": 4, "lora-8bit": 8}
    for name in METHODS:
        cfg = Config(model="shape:tiny", data={"path": "x.jsonl"}, method=name)
        assert cfg.uses_lora == (name in ADAPTER_METHODS)
    with pytest.raises(Exception, match="does not match method=lora"):
        Config(model="shape:tiny", data={"path": "x.jsonl"}, method="lora", quant={"bits": 4})


def test_weight_streaming_is_refused_for_methods_that_cannot_stream():
    for name, m in METHODS.items():
        if not m.streams_weights:
            with pytest.raises(Exception, match="offload.weights"):
                Config(model="shape:tiny", data={"path": "x.jsonl"}, method=name, offload={"weights": True})
