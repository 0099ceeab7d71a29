"""Tokenized-data cache, keyed by the data's content hash, the version of the code that tokenizes it, the
tokenizer, the chat template, max_seq_len and every data setting that changes the result, so a second run
skips reading and tokenizing."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.data.preference_tokenize import TokenizedCompletion, TokenizedPair
from snugtune.data.tokenize import TokenizedSample

CACHE_FORMAT = "3"
# Every entry starts with this text, so an existing file is replaced only when the cache wrote it (even a
# truncated one), never a file of someone else's that happens to have the name.
ENTRY_HEAD = '{"format": "snugtune-tokenized-cache/' + CACHE_FORMAT + '"'

# The version of the code that turns rows into tokens and labels, part of every key so that an entry
# written by other code is never served. Any change to these modules makes tests/data/test_cache.py fail
# until the new code's hash is recorded here (the test prints it) and the version bumped.
DATA_CODE_VERSION = 11
DATA_CODE_HASH = "3a6a73225210018282ccc6e4514621c7c9dbb6150fbafa4b7fd321c96905140c"
TOKENIZING_MODULES = (
    "snugtune.data.sources", "snugtune.data.folders", "snugtune.data.files", "snugtune.data.hub",
    "snugtune.data.llamafactory", "snugtune.data.columns", "snugtune.data.detect", "snugtune.data.format_registry",
    "snugtune.data.formats.alpaca", "snugtune.data.formats.conversation", "snugtune.data.formats.fields",
    "snugtune.data.formats.guanaco", "snugtune.data.formats.prompt_completion", "snugtune.data.formats.text",
    "snugtune.data.normalize", "snugtune.data.turns", "snugtune.data.turn_fields", "snugtune.data.templates",
    "snugtune.data.tokenize", "snugtune.data.prepare", "snugtune.data.rows", "snugtune.data.preference_rows",
    "snugtune.data.preference_tokenize", "snugtune.data.formats.preference")
# the kinds of examples an entry holds, each stored as the list of its fields' values (but reference_logps,
# which a run computes from its model)
EXAMPLE_TYPES = {"sample": TokenizedSample, "pair": TokenizedPair, "labelled": TokenizedCompletion}
_STORED = {name: [f.name for f in fields(kind) if f.name != "reference_logps"] for name, kind in EXAMPLE_TYPES.items()}


def cache_key(digest: str, data: DataConfig, tokenizer, max_seq_len: int, seed: int, objective: str = "sft") -> str:
    """The entry's name: the data's content digest, the code version, the tokenizer's vocabulary and special
    tokens, the chat template, max_seq_len, the seed, the objective (kto unpairs pairs) and every data setting
    that changes the result."""
    h = hashlib.sha256(f"{CACHE_FORMAT}/{DATA_CODE_VERSION}/{DATA_CODE_HASH}/{digest}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                         getattr(tokenizer, "chat_template", None), max_seq_len, seed, objective,
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
    kind = EXAMPLE_TYPES.get(stored.get("kind"))
    if kind is None:
        return None
    unpack = lambda items: [kind(*values) for values in items]  # noqa: E731
    return unpack(stored["train"]), unpack(stored["eval"]), stored["report"]


def _written_by_cache(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(ENTRY_HEAD)) == ENTRY_HEAD.encode()


def _kind_of(examples: list) -> str:
    return next((name for name, kind in EXAMPLE_TYPES.items() if examples and isinstance(examples[0], kind)), "sample")


def store(cache_dir: Path, key: str, train: list, eval_: list, report: dict) -> None:
    """Write the entry (temp name, then rename); an existing file of that name the cache did not write stays."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{key}.json"
    if target.exists() and not (target.is_file() and _written_by_cache(target)):
        return  # not ours: keep it, and go without a cache entry
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    kind = _kind_of(train)
    pack = lambda items: [[getattr(s, name) for name in _STORED[kind]] for s in items]  # noqa: E731
    body = json.dumps({"kind": kind, "train": pack(train), "eval": pack(eval_), "report": report})
    tmp.write_text(ENTRY_HEAD + ", " + body[1:])
    os.replace(tmp, target)
