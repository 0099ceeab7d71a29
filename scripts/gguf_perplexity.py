"""Perplexity of a model's GGUF exports, in llama.cpp, on held-out text: one Markdown row per GGUF type.

  python scripts/gguf_perplexity.py MODEL_DIR [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--text FILE] [--chars N]
      [--context 512]

MODEL_DIR is a merged folder (`snugtune merge RUN --out DIR`) or any Llama/Qwen2 HF folder, such as the
embedded SmolLM2-135M-Instruct's converted copy (~/.cache/snugtune/models/smollm2-135m-instruct). The text
defaults to the bundled retention documents (standard-library module docstrings, never trained on).
Needs the gguf-quant extra.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from snugtune.export.gguf_file import export_gguf
from snugtune.export.quantize import gguf_perplexity, tensor_types

BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "src/snugtune/bundled/retention_docs.jsonl"


def held_out_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    return path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    parser.add_argument("--text", type=Path, default=BUNDLED_TEXT)
    parser.add_argument("--chars", type=int, default=None, help="score only the text's first N characters")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    text = held_out_text(args.text)[:args.chars]
    print("| type | MiB | tensors (llama.cpp's choice) | perplexity | vs f16 | tokens scored | seconds |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    with tempfile.TemporaryDirectory() as work:
        for kind in args.types.split(","):
            started = time.time()
            path = export_gguf(args.model_dir, Path(work) / f"model-{kind}.gguf", kind)
            perplexity, scored = gguf_perplexity(path, text, args.context)
            baseline = baseline or perplexity
            kinds = ", ".join(f"{count} {name}" for name, count in tensor_types(path).most_common())
            print(f"| {kind} | {path.stat().st_size / 2**20:.1f} | {kinds} | {perplexity:.3f} | "
                  f"{100 * (perplexity / baseline - 1):+.2f}% | {scored} | {time.time() - started:.0f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
