"""Merge equivalence, GGUF round trip through transformers' GGUF loader, chat one-shot output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import alpaca_rows, tiny_config, write_jsonl
from snugtune.config import UserError
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


def test_gguf_refuses_unsupported_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi"}))
    with pytest.raises(UserError, match="supports llama, mistral, qwen2 models, not phi"):
        write_gguf(tmp_path, tmp_path / "x.gguf")


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
