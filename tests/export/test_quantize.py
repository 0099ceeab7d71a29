"""GGUF quantizations made by llama.cpp's own quantizer, loaded and evaluated by llama.cpp itself."""

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from snugtune.cli import app
from snugtune.errors import UserError
from snugtune.export.gguf_file import check_gguf_type, export_gguf
from snugtune.export.quantize import gguf_perplexity, tensor_types
from snugtune.models.resolve import resolve_model

TEXT = ("def wrap(text, width=70):\n    lines, line = [], ''\n    for word in text.split():\n"
        "        if len(line) + len(word) > width:\n            lines.append(line)\n            line = ''\n"
        "        line += word + ' '\n    return lines + [line]\n") * 6


def tiny_llama(folder: Path, hidden: int) -> Path:
    """A random Llama with SmolLM2's tokenizer and tied embeddings, `hidden` wide, saved as merge saves one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    source = resolve_model("shape:tiny").path
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                         max_position_embeddings=2048))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    folder = tiny_llama(tmp_path_factory.mktemp("gguf") / "model", hidden=256)
    return folder, {kind: export_gguf(folder, folder / f"model-{kind}.gguf", kind) for kind in ("f16", "q4_k_m")}


@pytest.mark.slow
def test_q4_k_m_is_llama_cpps_mix_and_leaves_only_the_file(exported):
    import gguf
    folder, files = exported
    kinds = tensor_types(files["q4_k_m"])
    assert kinds == Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(files["q4_k_m"]).tensors)
    # llama.cpp's Q4_K_M: Q4_K for most matrices, Q6_K for some (attn_v, ffn_down, the tied embedding), F32 norms
    assert kinds["Q4_K"] > 0 and kinds["Q6_K"] > 0 and kinds["F32"] == 5
    assert files["q4_k_m"].stat().st_size < 0.45 * files["f16"].stat().st_size
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the f16 intermediate is gone


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_transformers_and_q4_k_m_stays_close(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, files = exported
    f16, scored = gguf_perplexity(files["f16"], TEXT, context=64)
    q4, _ = gguf_perplexity(files["q4_k_m"], TEXT, context=64)
    # the same windows scored by transformers: BOS + 63 tokens, the second half of each window scored
    tokens = AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 64 + 2, 63):
        window = torch.tensor([[1] + tokens[start:start + 63]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=window).logits[0, 31:-1].double(), -1)
        total -= float(log_probs[torch.arange(32), window[0, 32:]].sum())
        count += 32
    assert scored == count
    assert f16 == pytest.approx(math.exp(total / count), rel=2e-3)
    assert q4 == pytest.approx(f16, rel=0.05) and q4 != f16


@pytest.mark.slow
def test_rows_not_a_multiple_of_256_fall_back_per_tensor(tmp_path):
    pytest.importorskip("llama_cpp")
    folder = tiny_llama(tmp_path / "model", hidden=160)  # like SmolLM2-135M's 576: 32 divides it, 256 does not
    kinds = tensor_types(export_gguf(folder, folder / "model.gguf", "q4_k_m"))
    # rows of 160 take llama.cpp's fallbacks (Q5_0 for Q4_K, Q8_0 for Q6_K); ffn_down's rows of 320 still do not fit
    assert "Q4_K" not in kinds and kinds["Q5_0"] > 0
    ppl, _ = gguf_perplexity(folder / "model.gguf", TEXT, context=64)
    assert np.isfinite(ppl)


def test_unknown_type_and_missing_bindings_are_exit_2_before_merging(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    with pytest.raises(UserError, match="choose one of f16, q8_0, q4_0, q4_k_m"):
        check_gguf_type("q3_k_s")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'snugtune\[gguf-quant\]'"):
        check_gguf_type("q4_k_m")
    check_gguf_type("q8_0")  # written without llama.cpp
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"base_model_path": str(tmp_path)}))
    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "out"), "--gguf",
                                      "--gguf-type", "q4_k_m"])
    assert result.exit_code == 2 and "gguf-quant" in result.output
    assert not (tmp_path / "out").exists()
