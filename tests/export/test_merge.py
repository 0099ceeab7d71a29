"""export/merge.py: the merged model equals base + adapter."""

import json

import torch

from conftest import logits_of
from snugtune.export.merge import merge_run


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
    out = logits_of(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)
    assert torch.allclose(out, logits_of(reference, ids), atol=1e-5)
    assert not torch.allclose(out, logits_of(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), ids),
                              atol=1e-3)  # the adapter really changed something
    bf16 = merge_run(qlora_run, tmp_path / "merged-bf16", "bf16")
    out16 = logits_of(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16), ids)
    assert (out16 - out).abs().max() < 0.05  # bf16 rounding only
