"""Check GGUF export against llama.cpp itself: a SentencePiece-style tokenizer and Llama-3.1 RoPE scaling.

  npm install node-llama-cpp && python scripts/llama_cpp_check_export.py

Builds the tiny models of tests/test_export.py, writes them with snugtune's GGUF writer and asks llama.cpp
(node-llama-cpp, prebuilt) to tokenize texts and to predict the next token; compares with transformers.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import _sentencepiece_llama  # noqa: E402

from snugtune.export.gguf_file import write_gguf  # noqa: E402

TEXTS = ["def wrap(text, width=70):", "two  spaces, naïve café ☃ 日本", " leading space", "x\n\ty = 1"]


def llama_cpp(gguf: Path, prompt: list[int]) -> dict:
    out = subprocess.run(["node", str(Path(__file__).with_name("llama_cpp_compare.mjs")), str(gguf),
                          json.dumps({"texts": TEXTS, "prompt": prompt})], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def next_token_probs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    work = Path(tempfile.mkdtemp())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    for name, extra in (("sentencepiece", {}), ("llama3-rope", {"rope_parameters": scaling})):
        # larger weights than the default init so the next-token distribution is far from uniform
        folder = _sentencepiece_llama(work / name, initializer_range=0.3, max_position_embeddings=512, **extra)
        gguf = write_gguf(folder, work / f"{name}.gguf", "f16")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = tokenizer("import os\n" * 30)["input_ids"][:200]
        result = llama_cpp(gguf, prompt)
        print(f"== {name}: {gguf.stat().st_size / 2**20:.1f} MiB")
        for text in TEXTS:  # node-llama-cpp's tokenize() leaves out BOS; llama.cpp adds it when evaluating
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            print(f"  tokens {'same' if ours == result['tokenized'][text] else 'DIFFERENT'}: {text!r} "
                  f"transformers {ours[:12]} llama.cpp {result['tokenized'][text][:12]}")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        probs = next_token_probs(model, prompt)
        plain_cfg = LlamaConfig.from_pretrained(folder)
        plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0 if extra else 10000.0}
        plain = AutoModelForCausalLM.from_pretrained(folder, config=plain_cfg, dtype=torch.float32)
        unscaled = next_token_probs(plain, prompt)
        cpp = {int(t): p for t, p in result["top"]}
        gap = max(abs(p - float(probs[t])) for t, p in cpp.items())
        gap_unscaled = max(abs(p - float(unscaled[t])) for t, p in cpp.items())
        print(f"  next token: llama.cpp top {list(cpp)[:5]}, transformers top {probs.topk(5).indices.tolist()}; "
              f"largest probability difference over llama.cpp's top 10: {gap:.4f} "
              f"(against the same weights with default RoPE: {gap_unscaled:.4f})")


if __name__ == "__main__":
    main()
