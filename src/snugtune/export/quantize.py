"""llama.cpp's own quantizer and evaluator, through its Python bindings (the snugtune[gguf-quant] extra).

`quantize_gguf` hands an f16 GGUF to llama.cpp's llama_model_quantize, the function behind the
`llama-quantize` tool, so the k-quant mixes (which tensors get Q6_K in Q4_K_M, the per-tensor fallbacks
for rows that are not a multiple of 256) are llama.cpp's, not a copy of them. `gguf_perplexity` loads a
GGUF in llama.cpp and scores held-out text the way `llama-perplexity` does.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from snugtune.errors import UserError

# --gguf-type -> llama.cpp's file type (its enum name in the bindings)
LLAMA_FILE_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
                    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def llama_cpp_bindings():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("this GGUF type is made by llama.cpp's quantizer: pip install 'snugtune[gguf-quant]' "
                        "(builds llama.cpp, several minutes)") from None
    return llama_cpp


def quantize_gguf(source: str | Path, target: str | Path, gguf_type: str) -> Path:
    """Quantize the f16 GGUF `source` into `target` (written under a temp name, then renamed)."""
    if gguf_type not in LLAMA_FILE_TYPES:
        raise UserError(f"--gguf-type: llama.cpp quantizes to {', '.join(LLAMA_FILE_TYPES)}, not {gguf_type}")
    llama_cpp = llama_cpp_bindings()
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FILE_TYPES[gguf_type])
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{source}: llama.cpp could not quantize it to {gguf_type} (status {status})")
    os.replace(tmp, target)
    return target


def tensor_types(path: str | Path) -> Counter:
    """How many tensors of each GGML type a GGUF file holds (what llama.cpp chose, fallbacks included)."""
    import gguf

    return Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors)


def gguf_perplexity(path: str | Path, text: str, context: int = 512) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` under the GGUF model at `path`, run by llama.cpp on the CPU.

    As `llama-perplexity` does: the tokens are cut into windows of `context` tokens, each begins with BOS,
    and only each window's second half is scored, so every scored token has at least context/2 before it.
    """
    llama_cpp = llama_cpp_bindings()
    model = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False)
    tokens = model.tokenize(text.encode(), add_bos=False)
    bos = model.token_bos()
    total, scored = 0.0, 0
    for start in range(0, len(tokens) - context + 2, context - 1):
        window = [bos] + tokens[start:start + context - 1]
        model.reset()
        model.eval(window)
        logits = np.asarray(model.scores[:len(window)], dtype=np.float64)
        first = len(window) // 2
        log_probs = logits[first - 1:-1] - np.logaddexp.reduce(logits[first - 1:-1], axis=1, keepdims=True)
        total -= float(log_probs[np.arange(len(log_probs)), window[first:]].sum())
        scored += len(window) - first
    if scored == 0:
        raise UserError(f"perplexity needs more than {context} tokens of text; this one has {len(tokens)}")
    return math.exp(total / scored), scored
