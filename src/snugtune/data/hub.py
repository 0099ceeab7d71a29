"""Datasets by their hub id (owner/name) or laid out as a hub repository, read through `datasets`.

`datasets.load_dataset` keeps its own cache, so a dataset is downloaded once; with data.max_samples set
the rows are streamed and only that many are read (github-code is a terabyte; 2,000 rows are not).
Offline (HF_HUB_OFFLINE=1), a cached dataset loads from that cache and a missing one fails at once.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterable

from snugtune.config import DataConfig
from snugtune.errors import ConfigError

def has_dataset_card(folder: Path) -> bool:
    """A folder laid out as a hub dataset repository: a README.md whose YAML header declares the data."""
    card = folder / "README.md"
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8-sig", errors="replace")
    return text.startswith("---") and re.search(r"^(configs|dataset_info):", text, re.MULTILINE) is not None


def load_saved(path: Path, split: str) -> Iterable[dict]:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict's data.split)."""
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"data.split: {path} is a DatasetDict without a '{split}' split ({', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def load_rows(source: str, data: DataConfig) -> Iterable[dict]:
    """The rows of data.split of a hub dataset id or hub-laid-out folder; only max_samples of them when set."""
    import datasets
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    # offline, a hub id loads from the arrow cache, which is read in place: nothing to stream
    stream = data.max_samples is not None and (not offline or Path(source).is_dir())
    try:
        loaded = datasets.load_dataset(source, name=data.subset, split=data.split, revision=data.revision,
                                       streaming=stream)
    except ValueError as exc:  # a missing or unknown subset or split; the message lists the ones there are
        message = " ".join(str(exc).split("Example of usage")[0].split())
        field = "data.subset" if "config" in message.lower() else "data.split"
        raise ConfigError(f"{field}: {source}: {message}") from None
    except RuntimeError as exc:  # datasets 4 runs no loading scripts
        raise ConfigError(f"data.path: {source}: {exc}; download its data files (parquet/jsonl) and set "
                          f"data.path to them") from None
    except (ConnectionError, FileNotFoundError) as exc:
        raise ConfigError(_not_available(source, offline, exc)) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise ConfigError(f"data.path: {source} is not a local file or folder, nor a dataset on the hub ({exc})") \
            from None
    return itertools.islice(loaded, data.max_samples) if stream else loaded


def _not_available(source: str, offline: bool, exc: Exception) -> str:
    fetch = (f"fetch it once: run this command once online, or copy it with `huggingface-cli download "
             f"--repo-type dataset {source} --local-dir FOLDER` and set data.path: FOLDER")
    if offline:
        return f"data.path: dataset {source} is not in the local datasets cache and HF_HUB_OFFLINE is set; {fetch}"
    return f"data.path: cannot load dataset {source} ({exc}); check the id and the network, or {fetch}"
