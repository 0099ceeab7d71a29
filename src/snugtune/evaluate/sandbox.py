"""Running untrusted generated code. The boundary is the operating system's: the program runs in fresh user,
mount, network, PID, IPC and UTS namespaces (made by util-linux `unshare`), sees only a read-only Python
install and a small writable tmpfs, has no network interface, no capabilities, and a seccomp filter that
refuses process creation and sockets (evaluate/confine.py builds all of this inside the child). Around it:
resource limits, no inherited descriptors, an audit hook as a second layer, and a kill of the whole process
group at the wall-clock limit.

Where this machine cannot make those namespaces, run_sandboxed refuses (SandboxUnavailable) unless the
caller accepts running the code with only the limits and the audit hook (isolate=False).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from snugtune.errors import UserError

CONFINE = Path(__file__).with_name("confine.py")
UNISOLATED_FLAG = "--allow-unisolated-code"
# Namespaces the child gets; --kill-child: the program dies with `unshare` when the parent kills the group.
UNSHARE = ("--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child")
PROBE_OK = "confined"


class SandboxUnavailable(UserError):
    """This machine cannot isolate generated code (no user namespaces, no `unshare`, not Linux)."""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout
    detail: str
    seconds: float
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def base_interpreter() -> str:
    """The interpreter a virtual environment was made from: the confined child needs only the standard library."""
    return getattr(sys, "_base_executable", None) or sys.executable


def isolation_problem() -> str | None:
    """Why this machine cannot isolate generated code, or None when it can (found by confining a trivial program)."""
    return probe_isolation(shutil.which("unshare"))


@functools.lru_cache(maxsize=4)
def probe_isolation(unshare: str | None) -> str | None:
    """isolation_problem for this `unshare` program (None: not installed); probed once per process."""
    if not sys.platform.startswith("linux"):
        return f"process isolation needs Linux namespaces (this is {sys.platform})"
    if unshare is None:
        return "`unshare` (util-linux) is not installed"
    result = _execute(f"print({PROBE_OK!r})", 20.0, 256 << 20, unshare)
    if result.passed and result.output.strip() == PROBE_OK:
        return None
    return f"making user, mount and network namespaces failed here ({result.detail})"


def require_isolation() -> None:
    """Raise SandboxUnavailable (exit 2) saying why and which flag accepts the risk, where isolation is impossible."""
    problem = isolation_problem()
    if problem:
        raise SandboxUnavailable(
            f"generated code will not be run: {problem}. Enable unprivileged user namespaces (e.g. sysctl "
            f"kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0) or run as a "
            f"user who may create them; {UNISOLATED_FLAG} runs it anyway with only resource limits and a Python "
            f"audit hook, which are not a security boundary")


def run_sandboxed(code: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, isolate: bool = True,
                  audit_hook: bool = True) -> SandboxResult:
    """Run Python `code` confined; passed means it exited 0 within the limits.

    isolate=False runs it without namespaces or seccomp (limits and the audit hook only): for machines that
    cannot isolate, and only when the user has accepted that risk. audit_hook=False leaves out the second
    layer (the tests use it to show the namespaces and seccomp hold on their own).
    """
    if isolate:
        require_isolation()
    return _execute(code, timeout_s, memory_bytes, shutil.which("unshare") if isolate else None, audit_hook)


def _execute(code: str, timeout_s: float, memory_bytes: int, unshare: str | None,
             audit_hook: bool = True) -> SandboxResult:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snugtune-sandbox-", ignore_cleanup_errors=True) as place:
        prefix = [unshare, *UNSHARE] if unshare else []
        modes = ["--isolate" if unshare else "--limits-only", "--audit-hook" if audit_hook else "--no-audit-hook"]
        command = [*prefix, base_interpreter(), "-I", "-S", str(CONFINE), *modes, place, str(memory_bytes),
                   str(int(timeout_s) + 1)]
        proc = subprocess.Popen(command, cwd=place, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"})
        try:
            out, err = proc.communicate(code.encode("utf-8"), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult("timeout", f"no result within {timeout_s:.0f}s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    output = out.decode("utf-8", "replace")
    if proc.returncode == 0:
        return SandboxResult("passed", "", seconds, output)
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return SandboxResult("failed", last[0][:300], seconds, output)
