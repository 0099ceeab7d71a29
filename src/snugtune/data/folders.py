"""Which files of a data folder are read: its data files of the split data.split names, or else its source
files, one text document each.

Splits follow the conventions `datasets` uses for a repository without a dataset card (its data_files.py):
`data/<split>-00000-of-00001.parquet` shards first, else a split keyword in a folder name, else in a file
name (`train.jsonl`, `alpaca_test.json`); train is train/training, validation is validation/valid/dev/val,
test is test/testing/eval/evaluation. A folder whose file names name no split is one split of everything.
"""

from __future__ import annotations

import re
from pathlib import Path

from snugtune.errors import ConfigError
from snugtune.data.files import DATA_KINDS, SOURCE_SUFFIXES, file_kind, regular_file

SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SEP = r"[-._ 0-9]"
_SHARD = re.compile(r"data/(?P<split>\w+?)-\d{5}-of-\d{5}[^/]*$")


def listed_files(folder: Path) -> list[Path]:
    """Every file under the folder but hidden ones (.git, .cache), sorted; anything else that is not a
    regular file (a FIFO, a device, a broken link) is refused before it is opened."""
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or path.is_dir():
            continue
        files.append(regular_file(path, "data.path"))
    return files


def folder_files(folder: Path, split: str) -> tuple[list[Path], bool, list[str]]:
    """(the files to read, whether they are source documents rather than data files, notes for the report)."""
    files = listed_files(folder)
    data_files = [p for p in files if file_kind(p)]
    if data_files:
        chosen, notes = split_files(folder, data_files, split)
        return chosen, False, notes
    sources = [p for p in files if p.suffix.lower() in SOURCE_SUFFIXES]
    if not sources:
        raise ConfigError(f"data.path: {folder} holds no data files ({', '.join(DATA_KINDS)}, or .gz of them) "
                          f"or source files")
    return sources, True, []


def _keyword_split(name: str, in_folder_name: bool) -> str | None:
    for split, keywords in SPLIT_KEYWORDS.items():
        for keyword in keywords:
            tail = rf"({_SEP}.*)?" if in_folder_name else rf"{_SEP}.*"
            if re.fullmatch(rf"(.*{_SEP})?{keyword}{tail}", name, re.IGNORECASE):
                return split
    return None


def _splits_by(scheme: str, relative: str) -> str | None:
    if scheme == "shards":
        match = _SHARD.fullmatch(relative)
        return match["split"] if match else None
    parts = relative.split("/")
    if scheme == "folder names":
        return next(filter(None, (_keyword_split(p, True) for p in parts[:-1])), None)
    return _keyword_split(parts[-1], False)


def split_files(folder: Path, files: list[Path], split: str) -> tuple[list[Path], list[str]]:
    """The files of data.split, by the first naming scheme that names any split; all of them when none does."""
    relative = {p: p.relative_to(folder).as_posix() for p in files}
    for scheme in ("shards", "folder names", "file names"):
        splits = {p: _splits_by(scheme, r) for p, r in relative.items()}
        found = sorted(set(filter(None, splits.values())))
        if not found:
            continue
        wanted = split if scheme == "shards" else next((s for s, kw in SPLIT_KEYWORDS.items() if split in kw), split)
        chosen = [p for p in files if splits[p] == wanted]
        if not chosen:
            raise ConfigError(f"data.split: {folder} has no '{split}' split (its {scheme} make the splits "
                              f"{', '.join(found)}); set data.split to one of them")
        left = [relative[p] for p in files if splits[p] != wanted]
        return chosen, [f"split '{split}' of {folder.name} (by {scheme}): {_names([relative[p] for p in chosen])}"
                        + (f"; left out: {_names(left)}" if left else "")]
    return files, []


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
