"""Tokenized-data cache, keyed by the data's content hash, the tokenizer, the chat template, max_seq_len
and every data setting that changes the result, so a second run skips reading and tokenizing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from snugtune.config import DataConfig
from snugtune.data.tokenize import TokenizedSample

CACHE_FORMAT = "2"


def _hash_path(path: Path, h) -> None:
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            _hash_path(p, h)
        return
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)


def cache_key(data: DataConfig, tokenizer, max_seq_len: int, seed: int) -> str:
    h = hashlib.sha256(CACHE_FORMAT.encode())
    _hash_path(Path(data.path), h)
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
    except (OSError, json.JSONDecodeError):
        return None  # a damaged cache file is rebuilt
    unpack = lambda items: [TokenizedSample(ids, labels) for ids, labels in items]  # noqa: E731
    return unpack(stored["train"]), unpack(stored["eval"]), stored["report"]


def store(cache_dir: Path, key: str, train: list[TokenizedSample], eval_: list[TokenizedSample], report: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    pack = lambda items: [[s.input_ids, s.labels] for s in items]  # noqa: E731
    tmp.write_text(json.dumps({"train": pack(train), "eval": pack(eval_), "report": report}))
    os.replace(tmp, cache_dir / f"{key}.json")
