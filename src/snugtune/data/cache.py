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
# Every entry starts with this text, so an existing file is replaced only when the cache wrote it (even a
# truncated one), never a file of someone else's that happens to have the name.
ENTRY_HEAD = '{"format": "snugtune-tokenized-cache/' + CACHE_FORMAT + '"'


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
