"""snugtune's cache folder (converted and random-weight base models, tokenized data), and building a folder
in it so that a reader never sees half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def default_cache_dir() -> Path:
    """Where converted and random-weight base models live (XDG cache, like HF's own)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "snugtune"


def staged_cache_folder(target: Path):
    """A temp folder beside `target`; call the returned commit() to rename it into place."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def commit() -> Path:
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
        return target
    return tmp, commit
