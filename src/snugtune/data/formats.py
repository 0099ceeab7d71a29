"""Reading data files and turning rows of each supported format into one normalized sample.

A sample is either {"messages": [{"role", "content"}, ...]} (trained on assistant turns) or
{"text": str} (trained on every token). Bad rows raise ConfigError naming file:row.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from snugtune.errors import ConfigError

DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
SOURCE_SUFFIXES = {".py", ".c", ".h", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".md", ".txt"}
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                 "system": "system", "chatgpt": "assistant", "model": "assistant"}
_PROMPT_COMPLETION_KEYS = [("prompt", "completion"), ("problem", "solution"), ("question", "answer")]


@dataclass
class Row:
    """One raw row and where it came from (file and 1-based line or row number)."""
    where: str
    value: object


@dataclass
class FormatChoice:
    name: str
    reason: str


@dataclass
class Skipped:
    """Rows skipped under data.skip_bad_rows, by reason."""
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


# ---------------------------------------------------------------------------------------------
# Files

def read_rows(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    """Yield rows from a file or folder. A folder of source files yields one {"text"} row per file."""
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        yield from _read_saved_dataset(path)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        data_files = [p for p in files if p.suffix in DATA_SUFFIXES]
        if data_files:
            for p in data_files:
                yield from read_rows(p, skipped, skip_bad_rows)
            return
        sources = [p for p in files if p.suffix in SOURCE_SUFFIXES]
        if not sources:
            raise ConfigError(f"data.path: {path} holds no data files ({', '.join(sorted(DATA_SUFFIXES))}) "
                              f"or source files")
        for p in sources:
            try:
                yield Row(str(p), {"text": p.read_text(encoding="utf-8")})
            except UnicodeDecodeError:
                _bad(f"{p}: not UTF-8 text", skipped, skip_bad_rows, "not UTF-8")
        return
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ConfigError(f"data.path: {path}: unsupported file type '{suffix}' (use {', '.join(sorted(DATA_SUFFIXES))})")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty")
    if suffix == ".jsonl":
        yield from _read_jsonl(path, skipped, skip_bad_rows)
    elif suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a JSON list of rows")
        for i, item in enumerate(items):
            yield Row(f"{path}:row {i + 1}", item)
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            for i, item in enumerate(csv.DictReader(handle)):
                yield Row(f"{path}:{i + 2}", item)  # line 1 is the header
    else:
        import pyarrow.parquet as pq
        for i, item in enumerate(pq.read_table(path).to_pylist()):
            yield Row(f"{path}:row {i + 1}", item)


def _read_saved_dataset(path: Path) -> Iterator[Row]:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict whose 'train' split is used)."""
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"data.path: {path} is a DatasetDict without a 'train' split ({list(loaded)})")
        loaded = loaded["train"]
    for i, item in enumerate(loaded):
        yield Row(f"{path}:row {i + 1}", item)


def _read_jsonl(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                _bad(f"{path}:{number}: not UTF-8", skipped, skip_bad_rows, "not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield Row(f"{path}:{number}", json.loads(line))
            except json.JSONDecodeError as exc:
                _bad(f"{path}:{number}: invalid JSON ({exc.msg})", skipped, skip_bad_rows, "invalid JSON")


def _bad(message: str, skipped: Skipped, skip_bad_rows: bool, reason: str) -> None:
    if not skip_bad_rows:
        raise ConfigError(message + " (set data.skip_bad_rows: true to skip such rows)")
    skipped.add(reason)


# ---------------------------------------------------------------------------------------------
# Formats

def detect_format(rows: list[Row]) -> FormatChoice:
    """Pick the format from the keys of the first rows; ConfigError when ambiguous or unknown."""
    votes: dict[str, str] = {}
    for row in rows[:20]:
        if not isinstance(row.value, dict):
            continue
        keys = {k.lower().lstrip("#").strip() for k in row.value}
        if "messages" in keys:
            votes["messages"] = "rows have a 'messages' list"
        elif "conversations" in keys:
            votes["sharegpt"] = "rows have a 'conversations' list"
        elif "instruction" in keys and "output" in keys:
            votes["alpaca"] = "rows have 'instruction' and 'output'"
        elif any(p in keys and c in keys for p, c in _PROMPT_COMPLETION_KEYS):
            votes["prompt-completion"] = "rows have a prompt/completion pair of fields"
        elif "text" in keys and "### human:" in str(row.value.get("text", row.value.get("Text", ""))).lower():
            votes["guanaco"] = "rows have 'text' with '### Human:' turns"
        elif "text" in keys:
            votes["text"] = "rows have a 'text' field"
    if "guanaco" in votes and "text" in votes:
        votes.pop("text")
    if len(votes) == 1:
        name, reason = next(iter(votes.items()))
        return FormatChoice(name, reason)
    where = rows[0].where.rsplit(":", 1)[0] if rows else "data"
    if not votes:
        raise ConfigError(f"{where}: cannot tell the data format from the first rows' keys; set data.format "
                          f"(alpaca, sharegpt, messages, guanaco, text, prompt-completion)")
    raise ConfigError(f"{where}: rows look like several formats ({', '.join(sorted(votes))}); set data.format")


def _field(row: Row, value: dict, *names: str, required: bool = True) -> str | None:
    lowered = {k.lower().lstrip("#").strip(): v for k, v in value.items()}
    for name in names:
        if name in lowered and lowered[name] is not None:
            if not isinstance(lowered[name], str):
                raise ConfigError(f"{row.where}: field '{name}' should be text, got {type(lowered[name]).__name__}")
            return lowered[name]
    if required:
        raise ConfigError(f"{row.where}: missing field '{names[0]}'")
    return None


def to_sample(row: Row, fmt: str) -> dict:
    """Normalize one raw row of format `fmt` into a sample dict (ConfigError naming the row if malformed)."""
    value = row.value
    if not isinstance(value, dict):
        raise ConfigError(f"{row.where}: expected an object with fields, got {type(value).__name__}")
    if fmt == "alpaca":
        instruction = _field(row, value, "instruction")
        extra = _field(row, value, "input", required=False) or ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _field(row, value, "output")}]}
    if fmt == "prompt-completion":
        for p, c in _PROMPT_COMPLETION_KEYS:
            if p in {k.lower() for k in value}:
                return {"messages": [{"role": "user", "content": _field(row, value, p)},
                                     {"role": "assistant", "content": _field(row, value, c)}]}
        raise ConfigError(f"{row.where}: missing field 'prompt' (or problem/question)")
    if fmt in ("messages", "sharegpt"):
        key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else \
            ("conversations", "from", "value")
        turns = value.get(key)
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{row.where}: '{key}' should be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise ConfigError(f"{row.where}: {key}[{i}] needs '{role_key}' and '{text_key}'")
            role = _ROLE_ALIASES.get(str(turn[role_key]).lower())
            if role is None:
                raise ConfigError(f"{row.where}: {key}[{i}] has unknown role '{turn[role_key]}'")
            if not isinstance(turn[text_key], str):
                raise ConfigError(f"{row.where}: {key}[{i}].{text_key} should be text")
            messages.append({"role": role, "content": turn[text_key]})
        return {"messages": messages}
    if fmt == "guanaco":
        return {"messages": _guanaco_turns(row, _field(row, value, "text"))}
    if fmt == "text":
        return {"text": _field(row, value, "text", "content", "code")}
    raise ConfigError(f"data.format: unknown format '{fmt}'")


_GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):", re.IGNORECASE)


def _guanaco_turns(row: Row, text: str) -> list[dict]:
    parts = _GUANACO_TURN.split(text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker.lower() == "human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    if not messages:
        raise ConfigError(f"{row.where}: no '### Human:' / '### Assistant:' turns in 'text'")
    return messages
