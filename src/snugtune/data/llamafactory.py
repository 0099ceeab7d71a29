"""A LLaMA-Factory data folder: its dataset_info.json names each dataset's file, format, columns and tags
(LLaMA-Factory's data/README.md); data.dataset picks the entry, read as LLaMA-Factory reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from snugtune.errors import ConfigError
from snugtune.data.columns import ColumnMap
from snugtune.data.files import read_whole

INFO_FILE = "dataset_info.json"
# LLaMA-Factory's column names -> our fields, by its formatting
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
# its sharegpt tags -> our turn keys, and the roles its role tags name
TURN_TAGS = {"role_tag": "role", "content_tag": "content"}
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
             "function_tag": "function_call", "system_tag": "system"}
# ranking entries' answers and KTO's label -> our fields (the preference and kto formats)
PREFERENCE_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
KTO_COLUMNS = {"kto_tag": "label"}
REFUSED_COLUMNS = {"images": "multimodal data (images)", "videos": "multimodal data (videos)",
                   "audios": "multimodal data (audios)"}
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
READ_KEYS = {"file_name", "formatting", "ranking", "columns", "tags", "num_samples", "split"}


@dataclass
class Entry:
    """What one entry says: the file (or folder) to read, its format, how its names map, how many rows."""
    path: Path
    format: str
    reason: str
    columns: ColumnMap
    num_samples: int | None
    split: str | None
    notes: list[str]


def is_info_folder(folder: Path) -> bool:
    """A LLaMA-Factory data folder (a save_to_disk folder has a dataset_info.json too, beside its state.json)."""
    return (folder / INFO_FILE).is_file() and not (folder / "state.json").exists()


def read_entry(folder: Path, name: str | None) -> Entry:
    info = _info(folder)
    where = f"{folder / INFO_FILE}"
    if name is None:
        if len(info) != 1:
            raise ConfigError(f"data.dataset: {where} describes {len(info)} datasets ({_listed(info)}); set "
                              f"data.dataset to the one to train on")
        name = next(iter(info))
    if name not in info:
        raise ConfigError(f"data.dataset: {where} has no entry '{name}' (it has {_listed(info)})")
    entry, at = info[name], f"{where}: entry '{name}'"
    _refuse(entry, at)
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    formatting = entry.get("formatting", "alpaca")
    notes = [f"{INFO_FILE} entry '{name}': {entry['file_name']}, formatting {formatting}"]
    notes += [f"{INFO_FILE} entry '{name}': '{k}' not used" for k in entry if k not in READ_KEYS]
    names = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    if formatting == "alpaca" and set(columns) == {"prompt"}:  # its pre-training form: one text column
        fmt, mapping = "text", ColumnMap({"text": columns["prompt"]}, optional=frozenset({"text"}))
    elif entry.get("ranking"):  # pairs: the prompt as its formatting says, and two answers
        fmt, mapping = "preference", _mapping(columns, {**names, **PREFERENCE_COLUMNS}, tags, at)
    elif "kto_tag" in columns:  # an answer, judged by its kto_tag
        fmt, mapping = "kto", _mapping(columns, {**names, **KTO_COLUMNS}, tags, at)
    else:
        fmt, mapping = ("alpaca" if formatting == "alpaca" else "sharegpt"), _mapping(columns, names, tags, at)
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError(f"{at}: num_samples should be a positive whole number, got {num_samples!r}")
    return Entry(folder / entry["file_name"], fmt, f"{INFO_FILE} entry '{name}' (formatting: {formatting})",
                 mapping, num_samples, entry.get("split"), notes)


def _info(folder: Path) -> dict:
    path = folder / INFO_FILE
    try:
        info = json.loads(read_whole(path).decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not info or not all(isinstance(v, dict) for v in info.values()):
        raise ConfigError(f"{path}: expected LLaMA-Factory's dataset descriptions, an object of "
                          f"{{NAME: {{file_name, formatting, columns, ...}}}}")
    return info


def _listed(info: dict, most: int = 8) -> str:
    names = list(info)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _refuse(entry: dict, at: str) -> None:
    hub = next((k for k in HUB_KEYS if k in entry), None)
    if hub:
        raise ConfigError(f"{at} reads {entry[hub]} from elsewhere ({hub}); set data.path to it (a hub dataset "
                          f"id, with data.subset and data.split) or download its files beside {INFO_FILE}")
    if not isinstance(entry.get("file_name"), str):
        raise ConfigError(f"{at} has no file_name")
    refused = next((k for k in (entry.get("columns") or {}) if k in REFUSED_COLUMNS), None)
    if refused:
        raise ConfigError(f"{at} has a '{refused}' column: {REFUSED_COLUMNS[refused]}, which snugtune does not "
                          f"train; use a supervised entry")
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt", "openai"):
        raise ConfigError(f"{at}: formatting '{entry['formatting']}' is not LLaMA-Factory's alpaca, sharegpt or openai")


def _mapping(columns: dict, names: dict[str, str], tags: dict, at: str) -> ColumnMap:
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise ConfigError(f"{at}: column '{unknown[0]}' is not one LLaMA-Factory reads for this formatting "
                          f"({', '.join(names)})")
    fields = {names[k]: v for k, v in columns.items() if isinstance(v, str)}
    fields.update({TURN_TAGS[k]: v for k, v in tags.items() if k in TURN_TAGS and isinstance(v, str)})
    roles = {v: ROLE_TAGS[k] for k, v in tags.items() if k in ROLE_TAGS and isinstance(v, str)}
    return ColumnMap(fields, roles, frozenset(fields))
