"""export/gguf_file.py: GGUF files read back by transformers' GGUF loader give the same logits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import logits_of
from snugtune.errors import UserError
from snugtune.export.gguf_file import write_gguf
from snugtune.export.merge import merge_run


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_gguf_round_trip_through_transformers(qlora_run, tmp_path, gguf_type, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    merged = merge_run(qlora_run, tmp_path / "merged", "fp32")
    (tmp_path / "g").mkdir()
    gguf_path = write_gguf(merged, tmp_path / "g" / "model.gguf", gguf_type)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = logits_of(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_path.name, dtype=torch.float32)
    got = logits_of(loaded, ids)
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
    expected = logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)
    got = logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=path.name, dtype=torch.float32), ids)
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


