import pytest
import torch

from snugtune.precision import resolve_precision


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, avx512_bf16, amx, expected):
    # emulated bf16 (an AVX2 or older AVX-512 CPU) is slower than fp32; native bf16 was 1.7x faster on the demo
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    precision = resolve_precision("auto", torch.device("cpu"))
    assert precision.name == expected and not precision.loss_scaling


def test_auto_on_a_cpu_is_fp32_where_torch_has_no_probe_for_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"


@pytest.mark.parametrize("asked", ["bf16", "fp16", "fp32"])
def test_a_precision_asked_for_on_a_cpu_is_the_one_used(monkeypatch, asked):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    precision = resolve_precision(asked, torch.device("cpu"))
    assert precision.name == asked and precision.loss_scaling == (asked == "fp16")


def test_bf16_on_a_cpu_runs_the_matrix_products_in_bf16_and_keeps_fp32_weights():
    layer = torch.nn.Linear(8, 4)
    with resolve_precision("bf16", torch.device("cpu")).autocast():
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
