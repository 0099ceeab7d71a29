"""Merge equivalence, GGUF round trip through transformers' GGUF loader, chat one-shot output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import alpaca_rows, tiny_config, write_jsonl
from snugtune.errors import UserError
from snugtune.engine.train import train
from snugtune.evaluate.run import load_run
from snugtune.export.gguf_file import write_gguf
from snugtune.export.merge import merge_run


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "a.jsonl", alpaca_rows(32))
    cfg = tiny_config(tmp, data, method="qlora", train={"max_steps": 4, "lr": 2e-2})
    train(cfg, show_progress=False)
    return Path(cfg.output_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_matches_base_plus_adapter_and_never_merges_into_4bit(qlora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = merge_run(qlora_run, tmp_path / "merged", "fp32")
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= \
        {p.name for p in merged.iterdir()}
    # reference: the full-precision base + adapter through peft (the adapter's own math, no 4-bit rounding)
    base_path = json.loads((qlora_run / "summary.json").read_text())["base_model_path"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), qlora_run)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    out = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    assert torch.allclose(out, _logits(reference, ids), atol=1e-5)
    assert not torch.allclose(out, _logits(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), ids),
                              atol=1e-3)  # the adapter really changed something
    bf16 = merge_run(qlora_run, tmp_path / "merged-bf16", "bf16")
    out16 = _logits(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16), ids)
    assert (out16 - out).abs().max() < 0.05  # bf16 rounding only


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_gguf_round_trip_through_transformers(qlora_run, tmp_path, gguf_type, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merged = merge_run(qlora_run, tmp_path / "merged", "fp32")
    (tmp_path / "g").mkdir()
    gguf_path = write_gguf(merged, tmp_path / "g" / "model.gguf", gguf_type)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_path.name, dtype=torch.float32)
    got = _logits(loaded, ids)
    assert (got - expected).abs().max() < tolerance * max(1.0, float(expected.abs().max()))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=gguf_path.name)
    original = AutoTokenizer.from_pretrained(merged)
    text = "def f(x):\n    return x + 1  # héllo\n<|im_start|>user"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template


def _sentencepiece_llama(folder: Path, **config) -> Path:
    """A tiny random Llama with a SentencePiece-style tokenizer (Llama-2's kind: ▁ for spaces, byte fallback,
    SentencePiece merge order), trained here on standard-library source."""
    import inspect
    import textwrap
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
    texts = inspect.getsource(textwrap).splitlines()
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    vocab = bpe.get_vocab()
    # SentencePiece merge order (as transformers converts Llama-2's tokenizer.model): every split of a
    # piece into two pieces, ordered by the merged piece's score (here: its id)
    merges = sorted(((left, piece[len(left):]) for piece, i in vocab.items() if i >= len(specials)
                     for left in (piece[:k] for k in range(1, len(piece)))
                     if left in vocab and piece[len(left):] in vocab),
                    key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, **config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_gguf_round_trip_of_a_sentencepiece_tokenizer(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = _sentencepiece_llama(tmp_path / "spm")
    (tmp_path / "g").mkdir()
    path = write_gguf(folder, tmp_path / "g" / "model.gguf", "f16")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6}  # unk, <s>, </s>, then the 256 byte tokens
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # llama.cpp adds <s> as Llama-2 does
    original = AutoTokenizer.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=path.name)  # (its GGUF reader adds no BOS)
    # (a text that starts with a space is left out: transformers' own Llama tokenizer then adds no "▁" of
    # its own while SentencePiece, llama.cpp and transformers' GGUF reader do)
    for text in ["def wrap(text, width=70):", "two  spaces, naïve café ☃ 日本", "x\n\ty = 1"]:
        ids = original(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids, text
        assert loaded.decode(ids) == text
    ids = torch.randint(0, len(original), (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=path.name, dtype=torch.float32), ids)
    assert (got - expected).abs().max() < 2e-3 * max(1.0, float(expected.abs().max()))


def test_gguf_writes_llama3_rope_scaling_as_llama_cpp_factors(tmp_path):
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    folder = _sentencepiece_llama(tmp_path / "l31", rope_parameters=scaling, max_position_embeddings=512)
    path = write_gguf(folder, tmp_path / "m.gguf", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    # transformers' own llama3 frequencies: llama.cpp divides the default ones by these factors
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert np.allclose(factors, (default / scaled.double()).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the band ...
    assert ((factors > 1.0) & (factors < 8.0)).any()  # ... and the smooth middle


def test_gguf_refuses_unsupported_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi"}))
    with pytest.raises(UserError, match="supports llama, mistral, qwen2 models, not phi"):
        write_gguf(tmp_path, tmp_path / "x.gguf")


@pytest.mark.slow
def test_chat_one_shot_prints_the_models_answer(qlora_run):
    from snugtune.chat import reply
    run = load_run(qlora_run, "cpu")
    pieces = []
    text = reply(run.model, run.tokenizer, [{"role": "user", "content": "Add 2 and 3."}], run.device, run.precision,
                 max_new_tokens=12, stream=pieces.append)
    assert text and "".join(pieces).strip() == text
    proc = subprocess.run([sys.executable, "-m", "snugtune", "chat", str(qlora_run), "--prompt", "Add 2 and 3.",
                           "--max-new-tokens", "12", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == text


def test_interactive_chat_keeps_history_and_resets():
    from snugtune import chat as chat_module
    seen = []

    def fake_reply(model, tokenizer, history, device, precision, max_new_tokens, stream):
        seen.append([m["content"] for m in history])
        stream("ok")
        return "ok"
    inputs = iter(["hi", "again", "/reset", "fresh", "/exit"])
    original, chat_module.reply = chat_module.reply, fake_reply
    try:
        chat_module.chat_loop(None, None, None, None, read=lambda _: next(inputs), write=lambda _: None)
    finally:
        chat_module.reply = original
    assert seen == [["hi"], ["hi", "ok", "again"], ["fresh"]]
