"""Running untrusted generated code: a subprocess with time, memory and file-size limits, no network,
a throwaway working directory, and an audit hook that refuses file access outside allowed places.

Layers: `unshare --net` (a network namespace with no interfaces) where the machine allows it; inside the
child, resource limits and a Python audit hook (it cannot be removed by the code it guards) that blocks
sockets, subprocesses, ctypes, writes outside the temp dir and reads outside it and Python's own install;
the parent kills the whole process group at the wall-clock limit.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_CHILD = r'''
import os, resource, sys
workdir, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.chdir(workdir)
source = open("program.py").read()
readable = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, workdir})
writable = os.path.realpath(workdir) + os.sep
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
           "os.spawn", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "webbrowser.",
           "urllib.Request", "ftplib.", "http.", "smtplib.", "imaplib.", "poplib.", "telnetlib.", "shutil.rmtree")
WRITE_EVENTS = {"os.remove", "os.unlink", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
                "os.link", "os.symlink", "os.truncate", "os.utime"}
READ_EVENTS = {"os.listdir", "os.scandir", "os.chdir"}  # the import system lists Python's own folders
def inside(path, roots):
    return (os.path.realpath(path) + os.sep).startswith(roots)
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        mode = args[1] or "r"
        writing = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))
        if not inside(path, (writable,) if writing else readable):
            raise PermissionError(f"sandbox: opening {path} is not allowed")
    elif event in WRITE_EVENTS | READ_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if not inside(os.fsdecode(args[0]), readable if event in READ_EVENTS else (writable,)):
            raise PermissionError(f"sandbox: {event} on {os.fsdecode(args[0])} is not allowed")
sys.addaudithook(guard)
del resource
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _network_namespace_prefix() -> tuple[str, ...]:
    """['unshare', '--net'] where this machine can make an empty network namespace, else nothing."""
    try:
        ok = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ("unshare", "--net") if ok else ()


def run_sandboxed(code: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> SandboxResult:
    """Run Python `code` in the sandbox; passed means it exited 0 within the limits."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snugtune-sandbox-") as workdir:
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        command = [*_network_namespace_prefix(), sys.executable, "-I", "-c", _CHILD, workdir,
                   str(memory_bytes), str(int(timeout_s) + 1)]
        proc = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"})
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult("timeout", f"no result within {timeout_s:.0f}s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if proc.returncode == 0:
        return SandboxResult("passed", "", seconds)
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return SandboxResult("failed", last[0][:300], seconds)
