"""Folders a command writes as a whole (`merge --out`, `report --out`): built in a sibling staging folder,
marked with the files written, then swapped in by rename. A folder is only ever replaced when its mark
says this command wrote it and it holds nothing else; a user's folder, a run folder, or a folder above or
inside a run folder is refused, never deleted."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from snugtune.errors import UserError

MARKER = ".snugtune-output.json"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _recorded_files(folder: Path, command: str) -> set[str] | None:
    """The files `command` recorded writing into folder, or None when the folder is not its output."""
    try:
        mark = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.get("written_by") != command:
        return None
    return set(mark.get("files", [])) | {MARKER}


def check_target(out_dir: Path, command: str, run_dirs: list[Path]) -> None:
    """Refuse (UserError, exit 2) an --out that is, contains or lies in a run folder, is not a plain folder,
    or is a non-empty folder that `command` did not write (or that holds files it did not write)."""
    option = f"{command} --out {out_dir}"
    target = out_dir.resolve()
    for run in run_dirs:
        if _inside(target, run.resolve()) or _inside(run.resolve(), target):
            raise UserError(f"{option}: is, contains or lies inside the run folder {run}; choose a folder outside it")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{option}: exists and is not a plain folder (a file or a link); choose another")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    recorded = _recorded_files(out_dir, command)
    if recorded is None:
        raise UserError(f"{option}: the folder is not empty and was not written by `snugtune {command}`; "
                        f"choose a new or empty folder (nothing was changed)")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in recorded or not p.is_file())
    if foreign:
        raise UserError(f"{option}: holds files `snugtune {command}` did not write ({', '.join(foreign[:3])}); "
                        f"move them out or choose another folder (nothing was changed)")


def staging_folder(out_dir: Path) -> Path:
    """A new empty folder beside out_dir to build the output in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))


def discard(staging: Path) -> None:
    """Remove a staging folder made by staging_folder (it holds only what this process wrote)."""
    shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out_dir: Path, command: str) -> Path:
    """Mark staging with its files, then put it at out_dir: a rename onto a missing or empty folder, or
    for this command's own earlier output, rename that aside, rename staging in, then delete the files
    the earlier mark lists. Call check_target first."""
    files = sorted(p.name for p in staging.iterdir())
    (staging / MARKER).write_text(json.dumps({"written_by": command, "files": files}, indent=2))
    recorded = _recorded_files(out_dir, command) if out_dir.is_dir() else None
    if recorded is None:
        os.replace(staging, out_dir)  # onto nothing or an empty folder (check_target refused the rest)
        return out_dir
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.replaced-", dir=out_dir.parent))
    os.replace(out_dir, aside)
    os.replace(staging, out_dir)
    for name in recorded:
        (aside / name).unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:
        pass  # something appeared there meanwhile: left in place rather than deleted
    return out_dir


def record_files(out_dir: Path, command: str, paths: list[Path]) -> None:
    """Add files written into out_dir after publish (a GGUF, a Modelfile) to its mark."""
    recorded = (_recorded_files(out_dir, command) or set()) - {MARKER}
    files = sorted(recorded | {Path(p).name for p in paths})
    tmp = out_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"written_by": command, "files": files}, indent=2))
    os.replace(tmp, out_dir / MARKER)
