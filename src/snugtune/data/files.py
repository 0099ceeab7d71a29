"""Reading the rows of one data file, each row tagged with where it came from (file and line), in bounded
memory and time.

JSONL, JSON, CSV and TSV are read here rather than through `datasets` so that a bad row is reported as
file:line; a UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad) is skipped in every text format, and a
`.gz` of any text format is read through gzip. Every read is bounded: a file that is not a regular file is
refused before it is opened, and the limits below stop a file, a decompressed stream or one line that is
too large with a message naming it, before anything holds it whole.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Iterator

from snugtune.errors import ConfigError
from snugtune.data.rows import Row, Skipped

MAX_ROW_BYTES = 64 << 20  # one JSONL line or CSV field
MAX_WHOLE_FILE_BYTES = 1 << 30  # a file read whole: .json, .txt, .parquet, a source file (decompressed, for .gz)
MAX_FILE_BYTES = 4 << 30  # a file read line by line: .jsonl, .csv, .tsv (decompressed, for .gz)

ROW_KINDS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # files of rows
DATA_KINDS = ROW_KINDS + (".txt",)  # and a text document
SOURCE_SUFFIXES = (".py", ".c", ".h", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".md")
CSV_SEPARATORS = (",", ";", "\t", "|")


def file_kind(path: Path) -> str:
    """The data kind a file name says (".jsonl" for both d.jsonl and d.jsonl.gz); "" when it says none."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
        return suffixes[-1] if suffixes and suffixes[-1] in DATA_KINDS and suffixes[-1] != ".parquet" else ""
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_KINDS else ""


def regular_file(path: Path, what: str = "data.path") -> Path:
    """The path, when it is a regular file (or a link to one); a FIFO, device or socket would block or never
    end, so it is refused before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ConfigError(f"{what}: {path} is {kind}; point it at a data file or a folder of data files")
    return path


class _Capped(io.RawIOBase):
    """A binary stream that stops with an error naming the file past `limit` bytes (so a decompressed .gz
    or a file that grows while it is read is bounded too)."""

    def __init__(self, raw, limit: int, path: Path):
        self.raw, self.limit, self.path, self.count = raw, limit, path, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n
        if self.count > self.limit:
            raise ConfigError(f"{self.path}: more than {_size(self.limit)} of data, the most snugtune reads from one "
                              f"such file; split it into several files in a folder")
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def open_bounded(path: Path, limit: int) -> io.BufferedReader:
    """The file's bytes (decompressed, for .gz), refused when there are more than `limit` of them."""
    regular_file(path)
    if os.path.getsize(path) > limit and not path.name.lower().endswith(".gz"):
        raise ConfigError(f"{path}: {_size(os.path.getsize(path))}, over the {_size(limit)} snugtune reads from one "
                          f"such file; split it into several files in a folder")
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return io.BufferedReader(_Capped(raw, limit, path), buffer_size=1 << 20)


def read_whole(path: Path) -> bytes:
    with open_bounded(path, MAX_WHOLE_FILE_BYTES) as handle:
        return handle.read()


def read_file(path: Path, skipped: Skipped, skip_bad_rows: bool, split: str, notes: list[str]) -> Iterator[Row]:
    """The rows of one data file; `notes` gets a line for anything chosen on the way (a CSV separator, the
    key rows were found under)."""
    kind = file_kind(path)
    if not kind:
        raise ConfigError(f"data.path: {path}: unsupported file type (use {', '.join(DATA_KINDS)}, or a .gz of "
                          f"one of them but .parquet)")
    if os.path.getsize(regular_file(path)) == 0:
        raise ConfigError(f"{path}: the file is empty")
    try:
        if kind == ".jsonl":
            yield from _read_jsonl(path, skipped, skip_bad_rows)
        elif kind == ".json":
            yield from _read_json(path, split, notes)
        elif kind in (".csv", ".tsv"):
            yield from _read_csv(path, kind, notes, skipped, skip_bad_rows)
        elif kind == ".parquet":
            yield from _read_parquet(path)
        else:
            yield from read_document(path, skipped, skip_bad_rows)
    except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz, a disk error
        raise ConfigError(f"{path}: cannot read it ({exc})") from None


def read_document(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    """A .txt or source file is one text document (split into chunks of max_seq_len later, never truncated)."""
    try:
        yield Row(str(path), {"text": read_whole(path).decode("utf-8-sig")})
    except UnicodeDecodeError:
        _bad(f"{path}: not UTF-8 text", skipped, skip_bad_rows, "not UTF-8")


def _lines(handle: io.BufferedReader) -> Iterator[bytes | None]:
    """The file's lines, each read up to MAX_ROW_BYTES: a longer one is passed over and given as None."""
    while True:
        line = handle.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_ROW_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the overlong line, a block at a time
            line = handle.readline(1 << 20)
        yield None


def _read_jsonl(path: Path, skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    with open_bounded(path, MAX_FILE_BYTES) as handle:
        for number, raw in enumerate(_lines(handle), start=1):
            if raw is None:
                _bad(f"{path}:{number}: the line is over {_size(MAX_ROW_BYTES)}, the most snugtune reads as one row",
                     skipped, skip_bad_rows, "line too long")
                continue
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
            except RecursionError:
                _bad(f"{path}:{number}: JSON nested too deeply", skipped, skip_bad_rows, "invalid JSON")


def _read_json(path: Path, split: str, notes: list[str]) -> Iterator[Row]:
    try:
        items = json.loads(read_whole(path).decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    items, note = _rows_in_json(items, path, split)
    if note:
        notes.append(note)
    for i, item in enumerate(items):
        yield Row(f"{path}:row {i + 1}", item)


def _rows_in_json(items, path: Path, split: str) -> tuple[list, str | None]:
    """The list of rows a JSON file holds: the file itself, or the one list of objects under a key of it
    ({"data": [...]}), or the one named like data.split ({"train": [...], "test": [...]})."""
    if isinstance(items, list):
        return items, None
    if not isinstance(items, dict):
        raise ConfigError(f"{path}: expected a JSON list of rows, got {type(items).__name__}")
    lists = [k for k, v in items.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if split in lists:
        return items[split], f"{path.name}: rows under the key '{split}' (data.split)"
    if len(lists) == 1:
        return items[lists[0]], f"{path.name}: rows under the key '{lists[0]}' (the one list of rows in the file)"
    if lists:
        raise ConfigError(f"{path}: several lists of rows, under the keys {', '.join(map(repr, lists))}; choose "
                          f"one with data.split")
    raise ConfigError(f"{path}: expected a JSON list of rows, or an object holding one under a key (its keys: "
                      f"{', '.join(map(repr, list(items)[:10])) or 'none'})")


def _read_csv(path: Path, kind: str, notes: list[str], skipped: Skipped, skip_bad_rows: bool) -> Iterator[Row]:
    previous = csv.field_size_limit(MAX_ROW_BYTES)  # the csv module's limit is process-wide: set back after
    try:
        separator = "\t" if kind == ".tsv" else sniff_separator(_text_start(path))
        if kind == ".csv":
            notes.append(f"CSV separator {separator!r} (sniffed from the first lines)")
        with io.TextIOWrapper(open_bounded(path, MAX_FILE_BYTES), encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            line = 2  # line 1 is the header; a quoted field may span lines
            try:
                for item in reader:
                    if None in item:  # more fields than the header names
                        _bad(f"{path}:{line}: {len(reader.fieldnames) + len(item[None])} fields, the header has "
                             f"{len(reader.fieldnames)} (separator {separator!r}; quote fields that hold it)",
                             skipped, skip_bad_rows, "more fields than the header")
                    else:
                        yield Row(f"{path}:{line}", item)
                    line = reader.line_num + 1
            except csv.Error as exc:
                raise ConfigError(f"{path}:{line}: not a readable CSV row ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save it as 'CSV UTF-8')") from None
    finally:
        csv.field_size_limit(previous)


def _text_start(path: Path) -> str:
    with io.TextIOWrapper(open_bounded(path, MAX_FILE_BYTES), encoding="utf-8-sig", newline="") as handle:
        return handle.read(1 << 16)


def sniff_separator(sample: str) -> str:
    """The separator that splits every one of the first lines into the same number of fields, the most of
    them; else the one splitting the header into the most fields (the reading then names the line that does
    not fit); else, for one column, one that splits no line; a comma when nothing tells."""
    consistent, header = {}, {}
    for separator in CSV_SEPARATORS:
        try:
            records = [r for r in csv.reader(io.StringIO(sample), delimiter=separator) if r][:50]
        except csv.Error:  # a field over the limit: the reading says so, with its line
            continue
        whole = records[:-1] if len(records) > 1 and not sample.endswith("\n") else records  # the last may be cut
        counts = {len(r) for r in whole}
        header[separator] = len(whole[0]) if whole else 0
        if len(counts) == 1:
            consistent[separator] = counts.pop()
    for choices in ({s: n for s, n in consistent.items() if n > 1}, {s: n for s, n in header.items() if n > 1},
                    consistent):
        if choices:
            return max(choices, key=lambda s: (choices[s], -CSV_SEPARATORS.index(s)))
    return ","


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq
    if os.path.getsize(path) > MAX_WHOLE_FILE_BYTES:
        raise ConfigError(f"{path}: over the {_size(MAX_WHOLE_FILE_BYTES)} snugtune reads from one parquet file; "
                          f"split it into shards in a folder")
    try:
        table = pq.read_table(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(f"{path}: not a readable parquet file ({exc})") from None
    for i, item in enumerate(table.to_pylist()):
        yield Row(f"{path}:row {i + 1}", item)


def _bad(message: str, skipped: Skipped, skip_bad_rows: bool, reason: str) -> None:
    if not skip_bad_rows:
        raise ConfigError(message + " (set data.skip_bad_rows: true to skip such rows)")
    skipped.add(reason)
