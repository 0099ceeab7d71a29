"""Reading rows from data files and folders, each row tagged with where it came from (file and line).

JSONL, JSON and CSV are read here rather than through `datasets` so that a bad row is reported as
file:line; a UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad) is skipped in every text format.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from snugtune.config import DataConfig, looks_like_dataset_id
from snugtune.errors import ConfigError
from snugtune.data import hub
from snugtune.data.rows import Row, Skipped

DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}
SOURCE_SUFFIXES = {".py", ".c", ".h", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".md"}



def read_rows(data: DataConfig, skipped: Skipped) -> Iterator[Row]:
    """Rows of data.path in file order: a file, a folder, a saved or hub-laid-out dataset, or a hub id."""
    path = Path(data.path)
    if not path.exists():
        if not looks_like_dataset_id(data.path):
            raise ConfigError(f"data.path: {path} does not exist")
        yield from _numbered(data.path, hub.load_rows(data.path, data))
    elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        yield from _numbered(str(path), hub.load_saved(path, data.split))
    elif path.is_dir() and hub.has_dataset_card(path):
        yield from _numbered(str(path), hub.load_rows(str(path), data))
    elif path.is_dir():
        yield from _read_folder(path, skipped, data.skip_bad_rows)
    else:
        yield from _read_file(path, skipped, data.skip_bad_rows)


def _numbered(source: str, items) -> Iterator[Row]:
    for i, item in enumerate(items):
        yield Row(f"{source}:row {i + 1}", item)


def _read_folder(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    """Every data file in the folder (sorted), or else every source file as one text document."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    data_files = [p for p in files if p.suffix.lower() in DATA_SUFFIXES]
    sources = data_files or [p for p in files if p.suffix.lower() in SOURCE_SUFFIXES]
    if not sources:
        raise ConfigError(f"data.path: {path} holds no data files ({', '.join(sorted(DATA_SUFFIXES))}) "
                          f"or source files")
    for p in sources:
        if p in data_files:
            yield from _read_file(p, skipped, skip_bad_rows)
        else:
            yield from _read_document(p, skipped, skip_bad_rows)


def _read_file(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ConfigError(f"data.path: {path}: unsupported file type '{suffix}' (use {', '.join(sorted(DATA_SUFFIXES))})")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_document}
    yield from readers[suffix](path, skipped, skip_bad_rows)


def _read_document(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    """A .txt or source file is one text document (split into chunks of max_seq_len later, never truncated)."""
    try:
        yield Row(str(path), {"text": path.read_text(encoding="utf-8-sig")})
    except UnicodeDecodeError:
        _bad(f"{path}: not UTF-8 text", skipped, skip_bad_rows, "not UTF-8")


def _read_jsonl(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                _bad(f"{path}:{number}: not UTF-8", skipped, skip_bad_rows, "not UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield Row(f"{path}:{number}", json.loads(line))
            except json.JSONDecodeError as exc:
                _bad(f"{path}:{number}: invalid JSON ({exc.msg})", skipped, skip_bad_rows, "invalid JSON")


def _read_json(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a JSON list of rows")
    for i, item in enumerate(items):
        yield Row(f"{path}:row {i + 1}", item)


def _read_csv(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            line = 2  # line 1 is the header; a quoted field may span lines
            for item in reader:
                yield Row(f"{path}:{line}", item)
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save it as 'CSV UTF-8')") from None


def _read_parquet(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    import pyarrow.parquet as pq
    yield from _numbered(str(path), pq.read_table(path).to_pylist())


def _bad(message: str, skipped: Skipped, skip_bad_rows: bool, reason: str) -> None:
    if not skip_bad_rows:
        raise ConfigError(message + " (set data.skip_bad_rows: true to skip such rows)")
    skipped.add(reason)
