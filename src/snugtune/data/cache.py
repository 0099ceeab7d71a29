"""Tokenized-data cache, keyed by the data's content hash, the version of the code that tokenizes it, the
tokenizer, the chat template, max_seq_len and every data setting that changes the result, so a second run
skips reading and tokenizing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.data.tokenize import TokenizedSample

CACHE_FORMAT = "2"
# Every entry starts with this text, so an existing file is replaced only when the cache wrote it (even a
# truncated one), never a file of someone else's that happens to have the name.
ENTRY_HEAD = '{"format": "snugtune-tokenized-cache/' + CACHE_FORMAT + '"'

# The version of the code that turns rows into tokens and labels, part of every key so that an entry
# written by other code is never served. Any change to these modules makes tests/data/test_cache.py fail
# until the new code's hash is recorded here (the test prints it) and the version bumped.
DATA_CODE_VERSION = 5
DATA_CODE_HASH = "7c9868b266a6ca1ce09d4dc30b44c52bd3b4391c033747749ca5e9bdc8cef347"
TOKENIZING_MODULES = (
    "snugtune.data.sources", "snugtune.data.folders", "snugtune.data.files", "snugtune.data.hub",
    "snugtune.data.llamafactory", "snugtune.data.columns", "snugtune.data.detect", "snugtune.data.format_registry",
    "snugtune.data.formats.alpaca", "snugtune.data.formats.conversation", "snugtune.data.formats.fields",
    "snugtune.data.formats.guanaco", "snugtune.data.formats.prompt_completion", "snugtune.data.formats.text",
    "snugtune.data.normalize", "snugtune.data.turns", "snugtune.data.turn_fields", "snugtune.data.templates",
    "snugtune.data.tokenize", "snugtune.data.prepare", "snugtune.data.rows", "snugtune.data.preference_rows",
    "snugtune.data.preference_tokenize")


def cache_key(digest: str, data: DataConfig, tokenizer, max_seq_len: int, seed: int) -> str:
    """The entry's name: the data's content digest, the code version, the tokenizer's vocabulary and special
    tokens, the chat template, max_seq_len, the seed and every data setting that changes the result."""
    h = hashlib.sha256(f"{CACHE_FORMAT}/{DATA_CODE_VERSION}/{DATA_CODE_HASH}/{digest}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                         getattr(tokenizer, "chat_template", None), max_seq_len, seed,
                         data.model_dump(exclude={"path", "packing"})], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load_cached(cache_dir: Path, key: str):
    """(train, eval, report dict) from the cache, or None."""
    path = cache_dir / f"{key}.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged cache file is rebuilt
    if not isinstance(stored, dict) or stored.get("format") != f"snugtune-tokenized-cache/{CACHE_FORMAT}":
        return None
    unpack = lambda items: [TokenizedSample(ids, labels) for ids, labels in items]  # noqa: E731
    return unpack(stored["train"]), unpack(stored["eval"]), stored["report"]


def _written_by_cache(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(ENTRY_HEAD)) == ENTRY_HEAD.encode()


def store(cache_dir: Path, key: str, train: list[TokenizedSample], eval_: list[TokenizedSample], report: dict) -> None:
    """Write the entry (temp name, then rename); an existing file of that name the cache did not write stays."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{key}.json"
    if target.exists() and not (target.is_file() and _written_by_cache(target)):
        return  # not ours: keep it, and go without a cache entry
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    pack = lambda items: [[s.input_ids, s.labels] for s in items]  # noqa: E731
    body = json.dumps({"train": pack(train), "eval": pack(eval_), "report": report})
    tmp.write_text(ENTRY_HEAD + ", " + body[1:])
    os.replace(tmp, target)
