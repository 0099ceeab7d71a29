"""A cgroup for one sandboxed program, where this machine lets this process make one (as root, or in a
delegated subtree). Its memory limit counts every page the program causes: anonymous memory, System V and
POSIX shared memory, memfd and tmpfs files, page cache and kernel objects, where RLIMIT_AS counts only the
address space; its pids limit counts tasks (threads included) whatever their uid.

cgroup v2 where the folder's cgroup.subtree_control already enables memory or pids (never changed here:
other processes live under it), else the v1 memory and pids hierarchies. Nothing here writes outside the
folders it makes (snugtune-sandbox-PID-RANDOM), and each is removed when its program has ended.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from snugtune.evaluate.confine import Mount, mount_table

CONTROLLERS = ("memory", "pids")
# (version, controller) -> the files written into a new cgroup: (file, value, required). Optional files exist
# only on some kernels (swap accounting, oom.group); the value "memory" or "tasks" is the limit asked for.
LIMIT_FILES = {
    (2, "memory"): (("memory.max", "memory", True), ("memory.swap.max", 0, False), ("memory.oom.group", 1, False)),
    (1, "memory"): (("memory.limit_in_bytes", "memory", True), ("memory.memsw.limit_in_bytes", "memory", False)),
    (2, "pids"): (("pids.max", "tasks", True),),
    (1, "pids"): (("pids.max", "tasks", True),),
}
# controller -> (events file by version, the counter that says its limit stopped the program)
EVENT_FILES = {"memory": ({1: "memory.oom_control", 2: "memory.events"}, "oom_kill"),
               "pids": ({1: "pids.events", 2: "pids.events"}, "max")}
REMOVE_TRIES = 200  # x 10 ms: tasks killed a moment ago may still be leaving the cgroup


@dataclass(frozen=True)
class Hierarchy:
    """A folder under which this process may make cgroups, and which of CONTROLLERS they have there."""
    version: int
    parent: Path
    controllers: tuple[str, ...]


@dataclass(frozen=True)
class Cgroup:
    """The folders made for one program: one per hierarchy (cgroup v2: a single folder)."""
    hierarchies: tuple[Hierarchy, ...]
    folders: tuple[Path, ...]


def _inside(mount: Mount, path: str) -> Path | None:
    """The folder of cgroup `path` (as /proc/self/cgroup names it) under this mount, if the mount shows it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return Path(mount.point, path[len(root):].lstrip("/"))


def _subtree_controllers(folder: Path) -> tuple[str, ...]:
    try:
        enabled = (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return ()
    return tuple(c for c in CONTROLLERS if c in enabled)


def find_hierarchies(mountinfo: str, own_cgroups: str) -> list[Hierarchy]:
    """Where sandbox cgroups could be made, from the texts of /proc/self/mountinfo and /proc/self/cgroup:
    v2, this process's cgroup or its parent if its subtree_control enables a controller; v1, this process's
    cgroup in the memory and pids hierarchies. Not yet tried (usable_hierarchies tries them)."""
    own = {}  # controller ('' for v2) -> this process's cgroup path
    for line in own_cgroups.splitlines():
        _, names, path = line.split(":", 2)
        own.update({name: path for name in names.split(",")})
    found: list[Hierarchy] = []
    for mount in mount_table(mountinfo):
        if mount.fstype == "cgroup2" and "" in own and (folder := _inside(mount, own[""])):
            for candidate in (folder, folder.parent) if folder != Path(mount.point) else (folder,):
                if enabled := _subtree_controllers(candidate):
                    found.append(Hierarchy(2, candidate, enabled))
                    break
        elif mount.fstype == "cgroup":
            for controller in CONTROLLERS:
                if controller in mount.super_options and controller in own and (
                        folder := _inside(mount, own[controller])):
                    found.append(Hierarchy(1, folder, (controller,)))
    taken: set[str] = set()
    kept = []
    for hierarchy in found:  # each controller from one hierarchy only
        new = tuple(c for c in hierarchy.controllers if c not in taken)
        if new:
            kept.append(Hierarchy(hierarchy.version, hierarchy.parent, new))
            taken.update(new)
    return kept


@functools.lru_cache(maxsize=1)
def usable_hierarchies() -> tuple[tuple[Hierarchy, ...], str]:
    """The hierarchies where this process can make a sandbox cgroup (found by making and removing one), and
    why a controller cannot be had here ('' when memory and pids both can)."""
    if not sys.platform.startswith("linux"):
        return (), f"cgroups need Linux (this is {sys.platform})"
    try:
        mountinfo, own = Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        return (), f"cannot read /proc/self: {exc.strerror}"
    usable, problems = [], []
    for hierarchy in find_hierarchies(mountinfo, own):
        try:
            remove_cgroup(make_cgroup((hierarchy,), 1 << 30, 64))
        except OSError as exc:
            problems.append(f"cannot make a cgroup under {hierarchy.parent}: {exc.strerror or exc}")
        else:
            usable.append(hierarchy)
    missing = [c for c in CONTROLLERS if not any(c in h.controllers for h in usable)]
    if missing and not problems:
        problems.append(f"no cgroup hierarchy here offers {' and '.join(missing)} to this process")
    return tuple(usable), "; ".join(problems) if missing else ""


def make_cgroup(hierarchies: tuple[Hierarchy, ...], memory_bytes: int, tasks: int) -> Cgroup:
    """A fresh cgroup in each hierarchy with the limits written; nothing is left behind if a write fails."""
    name = f"snugtune-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    values = {"memory": memory_bytes, "tasks": tasks}
    made: list[Path] = []
    try:
        for hierarchy in hierarchies:
            folder = hierarchy.parent / name
            folder.mkdir()
            made.append(folder)
            for controller in hierarchy.controllers:
                for file, value, required in LIMIT_FILES[hierarchy.version, controller]:
                    if required or (folder / file).exists():
                        (folder / file).write_text(str(values.get(value, value)))
    except OSError:
        remove_cgroup(Cgroup(hierarchies[:len(made)], tuple(made)))
        raise
    return Cgroup(hierarchies, tuple(made))


def entry_command(cgroup: Cgroup) -> list[str]:
    """A prefix for a command line: a shell that moves itself into the cgroup's folders, then execs the
    command, so every process the command starts is counted from its first instruction."""
    count = len(cgroup.folders)
    script = "".join(f'echo $$ > "${i + 1}" && ' for i in range(count)) + f'shift {count} && exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *(str(folder / "cgroup.procs") for folder in cgroup.folders)]


def limits_reached(cgroup: Cgroup) -> list[str]:
    """The controllers whose limit stopped something in this cgroup (memory: a task was OOM-killed; pids: a
    fork or thread was refused)."""
    reached = []
    for hierarchy, folder in zip(cgroup.hierarchies, cgroup.folders):
        for controller in hierarchy.controllers:
            files, counter = EVENT_FILES[controller]
            try:
                rows = dict(line.split() for line in (folder / files[hierarchy.version]).read_text().splitlines())
            except (OSError, ValueError):
                continue
            if int(rows.get(counter, 0)) > 0:
                reached.append(controller)
    return reached


def remove_cgroup(cgroup: Cgroup) -> None:
    """Kill whatever is still in the cgroup's folders, then remove them."""
    for folder in cgroup.folders:
        for attempt in range(REMOVE_TRIES):
            _kill_members(folder)
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == REMOVE_TRIES - 1:
                    raise
                time.sleep(0.01)


def _kill_members(folder: Path) -> None:
    if (folder / "cgroup.kill").exists():
        (folder / "cgroup.kill").write_text("1")
        return
    try:
        members = (folder / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in members:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
