"""Where the rows of data.path come from: found first (which files, which split, which names map onto which
fields), hashed, then read. Finding reads no rows, so a cached run hashes only the files it would read.

data.path is a file; a folder of data files (the data.split split of it) or of source files; a folder
written by `save_to_disk`; a folder laid out as a hub repository; a LLaMA-Factory folder (its
dataset_info.json, the data.dataset entry); or a hub dataset id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from snugtune.config import DataConfig, looks_like_dataset_id
from snugtune.errors import ConfigError
from snugtune.data import hub, llamafactory
from snugtune.data.columns import ColumnMap
from snugtune.data.detect import FormatChoice
from snugtune.data.files import read_document, read_file, regular_file
from snugtune.data.folders import folder_files, listed_files
from snugtune.data.rows import Row, Skipped

FILES, SAVED, HUB_FOLDER, HUB_ID = "files", "saved", "hub folder", "hub id"


@dataclass
class DataSource:
    kind: str  # FILES: read by snugtune; SAVED, HUB_FOLDER, HUB_ID: through `datasets`
    path: str
    files: list[Path]  # FILES: the files read; SAVED, HUB_FOLDER: every file of the folder (for the digest)
    split: str
    columns: ColumnMap
    documents: bool = False  # source files, one text document each
    format: FormatChoice | None = None  # what a dataset_info.json entry says the format is
    max_samples: int | None = None
    notes: list[str] = field(default_factory=list)  # how the data was found, for the report
    described_by: Path | None = None  # LLaMA-Factory's dataset_info.json: part of the digest, not read as rows


def locate(data: DataConfig) -> DataSource:
    """Which files hold data.path's rows, and how to read them; nothing is read but folder listings and
    LLaMA-Factory's dataset_info.json."""
    source = _find(data)
    if source.columns.describe():
        source.notes.append(f"columns mapped: {source.columns.describe()}")
    return source


def _find(data: DataConfig) -> DataSource:
    path = Path(data.path)
    columns = ColumnMap(dict(data.columns))
    if not path.exists() and not path.is_symlink():
        if not looks_like_dataset_id(data.path):
            raise ConfigError(f"data.path: {path} does not exist")
        return DataSource(HUB_ID, data.path, [], data.split, columns, max_samples=data.max_samples)
    if path.name == llamafactory.INFO_FILE and path.is_file():
        path = path.parent
    if not path.is_dir():
        return DataSource(FILES, data.path, [regular_file(path)], data.split, columns, max_samples=data.max_samples)
    if data.dataset is not None and not llamafactory.is_info_folder(path):
        raise ConfigError(f"data.dataset names an entry of LLaMA-Factory's {llamafactory.INFO_FILE}; {path} has none")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return DataSource(SAVED, str(path), listed_files(path), data.split, columns, max_samples=data.max_samples)
    if llamafactory.is_info_folder(path):
        return _llamafactory(path, data)
    if hub.has_dataset_card(path):
        return DataSource(HUB_FOLDER, str(path), listed_files(path), data.split, columns, max_samples=data.max_samples)
    files, documents, notes = folder_files(path, data.split)
    return DataSource(FILES, str(path), files, data.split, columns, documents, None, data.max_samples, notes)


def _llamafactory(folder: Path, data: DataConfig) -> DataSource:
    entry = llamafactory.read_entry(folder, data.dataset)
    split = entry.split or data.split
    columns = entry.columns.merged(data.columns)
    notes = list(entry.notes)
    max_samples = data.max_samples or entry.num_samples
    if data.max_samples is None and entry.num_samples:
        notes.append(f"num_samples {entry.num_samples} from {llamafactory.INFO_FILE} (data.max_samples overrides it)")
    if entry.path.is_dir():
        files, documents, found = folder_files(entry.path, split)
        notes += found
    else:
        files, documents = [regular_file(entry.path, f"{llamafactory.INFO_FILE} file_name")], False
    return DataSource(FILES, str(folder), files, split, columns, documents, FormatChoice(entry.format, entry.reason),
                      max_samples, notes, folder / llamafactory.INFO_FILE)


def read_source(source: DataSource, data: DataConfig) -> tuple[list[Row], Skipped]:
    """The rows of the source in file order; notes about how they were read go to source.notes."""
    skipped = Skipped()
    if source.kind in (HUB_ID, HUB_FOLDER):
        items = hub.load_rows(source.path, data)
    elif source.kind == SAVED:
        items = hub.load_saved(Path(source.path), source.split)
    else:
        rows = []
        for path in source.files:
            read = read_document(path, skipped, data.skip_bad_rows) if source.documents \
                else read_file(path, skipped, data.skip_bad_rows, source.split, source.notes)
            rows.extend(read)
        source.notes[:] = list(dict.fromkeys(source.notes))
        return rows, skipped
    return [Row(f"{source.path}:row {i + 1}", item) for i, item in enumerate(items)], skipped


def content_digest(source: DataSource, rows: list[Row] | None = None) -> str:
    """A sha256 that changes when the data changes: of the bytes of the files read (with their names, in a
    folder) and of the dataset_info.json describing them, or, for a hub dataset id, of the rows read."""
    h = hashlib.sha256()
    if source.kind == HUB_ID:
        for row in rows or []:
            h.update(json.dumps(row.value, sort_keys=True, default=str).encode())
        return h.hexdigest()
    folder = Path(source.path)
    for path in source.files + ([source.described_by] if source.described_by else []):
        if folder.is_dir():
            h.update((path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)).encode())
        with regular_file(path).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
