"""llama.cpp's own quantizer and evaluator, through its Python bindings (the snugtune[gguf-quant] extra).

`quantize_gguf` hands an f16 GGUF to llama.cpp's llama_model_quantize, the function behind the
`llama-quantize` tool, so the k-quant mixes (which tensors get Q6_K in Q4_K_M, the per-tensor fallbacks
for rows that are not a multiple of 256) are llama.cpp's, not a copy of them. `gguf_perplexity` loads a
GGUF in llama.cpp and scores held-out text the way `llama-perplexity` does.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from snugtune.errors import UserError
from snugtune.extras import require

# --gguf-type -> llama.cpp's file type (its enum name in the bindings)
LLAMA_FILE_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
                    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def llama_cpp_bindings(feature: str = "llama.cpp's quantizer"):
    """The llama_cpp module; ConfigError (exit 2) naming `feature` and the install command without it."""
    require("gguf-quant", feature)
    import llama_cpp
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


# GGUF metadata value types: fixed sizes by type id (8 = string, 9 = array are read as they come)
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def skip_gguf_value(data: bytes, pos: int, kind: int) -> int:
    """The position after one metadata value of GGUF type `kind` starting at `pos`."""
    if kind == 8:
        return pos + 8 + int.from_bytes(data[pos:pos + 8], "little")
    if kind != 9:
        return pos + GGUF_SCALAR_BYTES[kind]
    item, count = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if item != 8:
        return pos + count * GGUF_SCALAR_BYTES[item]
    for _ in range(count):
        pos += 8 + int.from_bytes(data[pos:pos + 8], "little")
    return pos


def tensor_types(path: str | Path) -> Counter:
    """How many tensors of each GGML type a GGUF file holds (what llama.cpp chose, fallbacks included).

    Reads only the header, skipping the metadata (gguf.GGUFReader parses every token of the vocabulary
    into its own array view: minutes for a 49k-token vocabulary)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return header_tensor_types(path, data)


def header_tensor_types(path: str | Path, data: mmap.mmap) -> Counter:
    """tensor_types of a GGUF file's bytes: skip the metadata, then read each tensor's type id."""
    import gguf

    magic, _, tensor_count, kv_count = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file")
    pos = 24
    for _ in range(kv_count):
        pos += 8 + int.from_bytes(data[pos:pos + 8], "little")  # the key
        kind = int.from_bytes(data[pos:pos + 4], "little")
        pos = skip_gguf_value(data, pos + 4, kind)
    kinds: Counter = Counter()
    for _ in range(tensor_count):
        pos += 8 + int.from_bytes(data[pos:pos + 8], "little")  # the name
        dims = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4 + 8 * dims
        kinds[gguf.GGMLQuantizationType(int.from_bytes(data[pos:pos + 4], "little")).name] += 1
        pos += 4 + 8  # the type, then the data offset
    return kinds


def _plain_cpu_model(llama_cpp, **settings):
    """llama_cpp.Llama(**settings) with its weights in plain CPU buffers (llama_model_params.use_extra_bufts
    off, which Llama() does not take): on a CPU with AMX, llama.cpp repacks Q4_K weights for its AMX matmul,
    which crashed the process (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36, a Sapphire Rapids
    CPU); the plain kernels score the same tokens, a little slower."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def plain_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = plain_params  # read once, by Llama() as it loads the model
    try:
        return llama_cpp.Llama(**settings)
    finally:
        low.llama_model_default_params = defaults


def gguf_perplexity(path: str | Path, text: str, context: int = 512) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` under the GGUF model at `path`, run by llama.cpp on the CPU.

    As `llama-perplexity` does: the tokens are cut into windows of `context` tokens, each begins with BOS,
    and only each window's second half is scored, so every scored token has at least context/2 before it.
    """
    llama_cpp = llama_cpp_bindings("GGUF perplexity (llama.cpp)")
    model = _plain_cpu_model(llama_cpp, model_path=str(path), n_ctx=context, n_batch=context, logits_all=True,
                             verbose=False, n_threads=os.cpu_count() or 1)
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
