"""Running untrusted generated code. The boundary is the operating system's: the program runs in fresh
mount, network, PID, IPC and UTS namespaces made by util-linux `unshare` (plus a user namespace where the
evaluator is not root; as root the program runs as an unprivileged uid instead), sees only a read-only
Python install and a small writable tmpfs, has no network interface, no capabilities, and a seccomp filter
that refuses process creation, sockets and shared memory (evaluate/confine.py builds all of this inside the
child). Around it: a cgroup counting all its memory and tasks where this machine allows one
(evaluate/cgroup.py), resource limits, no inherited descriptors, an audit hook as a second layer, at most
OUTPUT_BYTES of each output stream kept, and a kill of the whole process group at the wall-clock limit.

Where this machine cannot make those namespaces, run_sandboxed refuses (SandboxUnavailable) unless the
caller accepts running the code with only the limits and the audit hook (isolate=False).
describe_limits says, in words, which limits hold on this machine and which could not be enforced.
"""

from __future__ import annotations

import collections
import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from snugtune.errors import UserError
from snugtune.evaluate.cgroup import Cgroup, Hierarchy, entry_command, limits_reached, make_cgroup, remove_cgroup, \
    usable_hierarchies
from snugtune.evaluate.confine import BOX, BOX_BYTES, BOX_FILES, DESCRIPTORS, FILE_BYTES, SANDBOX_ID

CONFINE = Path(__file__).with_name("confine.py")
UNISOLATED_FLAG = "--allow-unisolated-code"
_NAMESPACES = ("--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child")
# Isolation -> `unshare` options. root: the evaluator is root, no user namespace is needed and the program
# runs as SANDBOX_ID; user: an unprivileged user's namespace. --kill-child: the program dies with `unshare`.
UNSHARE = {"root": _NAMESPACES, "user": ("--user", "--map-root-user", *_NAMESPACES)}
PROBE = "import json\nprint(json.dumps('confined'))\n"  # a lazy import: the Python install must be readable
PROBE_OK = '"confined"'
TASKS = 64  # tasks (threads included) in the sandbox, `unshare` itself counted
OUTPUT_BYTES = 1 << 20  # kept of each of stdout (its start) and stderr (its end); the rest is read and dropped
READ_BYTES = 1 << 16


class SandboxUnavailable(UserError):
    """This machine cannot isolate generated code (no user namespaces, no `unshare`, not Linux)."""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | timeout
    detail: str
    seconds: float
    output: str = ""
    dropped_bytes: int = 0  # output read and discarded beyond OUTPUT_BYTES

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Confinement:
    """How programs are confined here. isolation: 'root' (namespaces made as root, the program then runs as
    SANDBOX_ID), 'user' (a user namespace) or 'none' (limits and the audit hook only); cgroups: where each
    program gets a cgroup, and cgroup_problem why memory or pids could not be had."""
    isolation: str
    unshare: str | None = None
    cgroups: tuple[Hierarchy, ...] = ()
    cgroup_problem: str = ""

    @property
    def cgroup_controllers(self) -> set[str]:
        return {c for h in self.cgroups for c in h.controllers}


@dataclass
class BoundedOutput:
    """What the parent keeps of one output stream: at most OUTPUT_BYTES, its start or its end."""
    keep_end: bool
    chunks: collections.deque = field(default_factory=collections.deque)
    kept: int = 0
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if not self.keep_end:
            chunk = chunk[:OUTPUT_BYTES - self.kept]
        if not chunk:
            return
        self.chunks.append(chunk)
        self.kept += len(chunk)
        while self.keep_end and self.kept - len(self.chunks[0]) >= OUTPUT_BYTES:
            self.kept -= len(self.chunks.popleft())

    def data(self) -> bytes:
        return b"".join(self.chunks)[-OUTPUT_BYTES:]

    @property
    def dropped(self) -> int:
        return self.total - min(self.kept, OUTPUT_BYTES)


def base_interpreter() -> str:
    """The interpreter a virtual environment was made from: the confined child needs only the standard library."""
    return getattr(sys, "_base_executable", None) or sys.executable


def isolation_problem() -> str | None:
    """Why this machine cannot isolate generated code, or None when it can (found by confining a trivial program)."""
    return probe_isolation(shutil.which("unshare"))[1]


@functools.lru_cache(maxsize=4)
def probe_isolation(unshare: str | None) -> tuple[str | None, str | None]:
    """(isolation, None) for the first of 'root' (only when the evaluator is root) and 'user' that confines
    a trivial program with this `unshare` (None: not installed), or (None, why neither does). Once per process."""
    if not sys.platform.startswith("linux"):
        return None, f"process isolation needs Linux namespaces (this is {sys.platform})"
    if unshare is None:
        return None, "`unshare` (util-linux) is not installed"
    failures = []
    for isolation in ("root", "user") if os.geteuid() == 0 else ("user",):
        result = _execute(PROBE, 20.0, 256 << 20, Confinement(isolation, unshare))
        if result.passed and result.output.strip() == PROBE_OK:
            return isolation, None
        failures.append(f"{isolation}: {result.detail}")
    return None, f"making user, mount and network namespaces failed here ({'; '.join(failures)})"


def require_isolation() -> None:
    """Raise SandboxUnavailable (exit 2) saying why and which flag accepts the risk, where isolation is impossible."""
    problem = isolation_problem()
    if problem:
        raise SandboxUnavailable(
            f"generated code will not be run: {problem}. Enable unprivileged user namespaces (e.g. sysctl "
            f"kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0) or run as a "
            f"user who may create them; {UNISOLATED_FLAG} runs it anyway with only resource limits and a Python "
            f"audit hook, which are no security boundary at all")


def confinement_here(isolate: bool = True) -> Confinement:
    """This machine's confinement: isolated (SandboxUnavailable where impossible), or, with isolate=False,
    limits and the audit hook only; cgroups wherever they can be made."""
    cgroups, cgroup_problem = usable_hierarchies()
    if not isolate:
        return Confinement("none", None, cgroups, cgroup_problem)
    require_isolation()
    unshare = shutil.which("unshare")
    return Confinement(probe_isolation(unshare)[0], unshare, cgroups, cgroup_problem)


def run_sandboxed(code: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, isolate: bool = True,
                  audit_hook: bool = True, confinement: Confinement | None = None) -> SandboxResult:
    """Run Python `code` confined; passed means it exited 0 within the limits.

    isolate=False runs it without namespaces or seccomp (limits and the audit hook only): for machines that
    cannot isolate, and only when the user has accepted that risk. audit_hook=False leaves out the second
    layer (the tests use it to show the namespaces and seccomp hold on their own). confinement: this
    machine's (confinement_here) unless given; the tests pass others to try each mechanism on its own.
    """
    return _execute(code, timeout_s, memory_bytes, confinement or confinement_here(isolate), audit_hook)


def describe_limits(confinement: Confinement, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> dict:
    """What bounds a program on this machine, in words: the limits enforced and how, and those that could
    not be enforced here ('what (why)'), for the eval results and the printed table."""
    enforced = [f"wall clock {timeout_s:g} s, CPU {cpu_seconds(timeout_s)} s, files {FILE_BYTES >> 20} MiB, "
                f"{DESCRIPTORS} descriptors",
                f"output: first {OUTPUT_BYTES >> 20} MiB of stdout and last {OUTPUT_BYTES >> 20} MiB of stderr kept"]
    missing = []
    if confinement.isolation == "none":
        missing.append("isolation (no namespaces or seccomp: the program can read and write this user's files, "
                       "use the network and start processes; the audit hook is no security boundary)")
    else:
        who = ("a user namespace" if confinement.isolation == "user" else
               f"made as root, the program runs as uid {SANDBOX_ID}")
        enforced += [f"namespaces: mount, network (none), PID, IPC, UTS; {who}",
                     f"read-only view (every mount, recursively) but {BOX}, a tmpfs of {BOX_BYTES >> 20} MiB and "
                     f"{BOX_FILES} files",
                     "seccomp: no processes, sockets, mounts, shared memory, memfd or POSIX timers"]
    for holds, detail in (_memory_limit(confinement, memory_bytes), _task_limit(confinement)):
        (enforced if holds else missing).append(detail)
    if "memory" not in confinement.cgroup_controllers:
        enforced.append(f"memory {memory_bytes >> 20} MiB of address space (RLIMIT_AS)")
    return {"isolation": confinement.isolation, "enforced": enforced, "not_enforced": missing}


def _memory_limit(confinement: Confinement, memory_bytes: int) -> tuple[bool, str]:
    version = {h.version for h in confinement.cgroups if "memory" in h.controllers}
    if version:
        return True, f"memory {memory_bytes >> 20} MiB, every kind (cgroup v{version.pop()}; RLIMIT_AS too)"
    uncounted = "shared memory, memfd and kernel memory" if confinement.isolation == "none" else "kernel memory"
    return False, f"memory cgroup ({confinement.cgroup_problem}): {uncounted} not counted"


def _task_limit(confinement: Confinement) -> tuple[bool, str]:
    version = {h.version for h in confinement.cgroups if "pids" in h.controllers}
    if version:
        return True, f"{TASKS} tasks (cgroup v{version.pop()} pids.max)"
    if confinement.isolation == "root" or (confinement.isolation == "user" and os.geteuid() != 0):
        return True, f"{TASKS} tasks (RLIMIT_NPROC of the sandbox's own uid)"
    why = ("without a user namespace RLIMIT_NPROC would count all this user's processes"
           if confinement.isolation == "none" else "RLIMIT_NPROC does not bind uid 0")
    return False, f"task limit ({confinement.cgroup_problem}; {why})"


def cpu_seconds(timeout_s: float) -> int:
    return int(timeout_s) + 1  # RLIMIT_CPU: the wall clock ends a busy program first


def _command(confinement: Confinement, audit_hook: bool, place: str, timeout_s: float, memory_bytes: int,
             cgroup: Cgroup | None) -> list[str]:
    isolation = confinement.isolation
    confine_args = ["--isolate" if isolation != "none" else "--limits-only",
                    "--audit-hook" if audit_hook else "--no-audit-hook", place, str(memory_bytes),
                    str(cpu_seconds(timeout_s)), str(TASKS if isolation != "none" else 0),
                    str(SANDBOX_ID) if isolation == "root" else "-"]
    namespaces = [confinement.unshare, *UNSHARE[isolation]] if isolation != "none" else []
    return [*(entry_command(cgroup) if cgroup else []), *namespaces, base_interpreter(), "-I", "-S", str(CONFINE),
            *confine_args]


def _execute(code: str, timeout_s: float, memory_bytes: int, confinement: Confinement,
             audit_hook: bool = True) -> SandboxResult:
    started = time.perf_counter()
    cgroup = _cgroup_for(confinement, memory_bytes)
    try:
        with tempfile.TemporaryDirectory(prefix="snugtune-sandbox-", ignore_cleanup_errors=True) as place:
            proc = subprocess.Popen(_command(confinement, audit_hook, place, timeout_s, memory_bytes, cgroup),
                                    cwd=place, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True,
                                    env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"})
            try:
                out, err, finished = _exchange(proc, code.encode("utf-8"), started + timeout_s)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    stream.close()
        memory_reached = cgroup is not None and "memory" in limits_reached(cgroup)
    finally:
        if cgroup:
            _remove(cgroup)
    seconds, dropped = time.perf_counter() - started, out.dropped + err.dropped
    output = out.data().decode("utf-8", "replace")
    if not finished:
        return SandboxResult("timeout", f"no result within {timeout_s:.0f}s", seconds, output, dropped)
    if proc.returncode == 0:
        return SandboxResult("passed", "", seconds, output, dropped)
    if memory_reached:
        detail = f"killed: memory limit of {memory_bytes >> 20} MiB reached"
    else:
        detail = (err.data().decode("utf-8", "replace").strip().splitlines()[-1:] or
                  [f"exit code {proc.returncode}"])[0][:300]
    return SandboxResult("failed", detail, seconds, output, dropped)


def _cgroup_for(confinement: Confinement, memory_bytes: int) -> Cgroup | None:
    if not confinement.cgroups:
        return None
    try:
        return make_cgroup(confinement.cgroups, memory_bytes, TASKS)
    except OSError as exc:
        raise SandboxUnavailable(f"sandbox: could not make a cgroup under {confinement.cgroups[0].parent}: "
                                 f"{exc.strerror or exc}") from None


def _remove(cgroup: Cgroup) -> None:
    try:
        remove_cgroup(cgroup)
    except OSError as exc:  # something outlived its kill: worth stopping the evaluation for
        raise UserError(f"sandbox: could not remove cgroup {exc.filename or cgroup.folders[0]}: "
                        f"{exc.strerror or exc}; its processes may still run") from None


def _exchange(proc: subprocess.Popen, code: bytes, deadline: float) -> tuple[BoundedOutput, BoundedOutput, bool]:
    """Write the program to the child's stdin and read its stdout and stderr until the child exits or the
    deadline passes (finished: False). The parent holds at most OUTPUT_BYTES of each stream: the start of
    stdout, the end of stderr (where a traceback's last line is); the rest is read and dropped, so the child
    never blocks on a full pipe and the parent's memory stays bounded."""
    outputs = {proc.stdout: BoundedOutput(keep_end=False), proc.stderr: BoundedOutput(keep_end=True)}
    pending = memoryview(code)
    os.set_blocking(proc.stdin.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        for stream in outputs:
            selector.register(stream, selectors.EVENT_READ)
        while any(key.fileobj in outputs for key in selector.get_map().values()):
            left = deadline - time.perf_counter()
            if left <= 0:
                return *outputs.values(), False
            for key, _ in selector.select(left):
                if key.fileobj is proc.stdin:
                    pending = _feed(proc, selector, pending)
                elif chunk := os.read(key.fd, READ_BYTES):
                    outputs[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
    try:
        proc.wait(max(deadline - time.perf_counter(), 0))
    except subprocess.TimeoutExpired:
        return *outputs.values(), False
    return *outputs.values(), True


def _feed(proc: subprocess.Popen, selector: selectors.BaseSelector, pending: memoryview) -> memoryview:
    """Write what the child's stdin takes now; close it once all is written (or the child stopped reading)."""
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending[:READ_BYTES]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        pending = pending[:0]
    if not pending:
        selector.unregister(proc.stdin)
        proc.stdin.close()
    return pending
