"""The sandbox for generated code, attacked for real on this machine: known escapes fail under the OS
isolation alone, under the audit hook alone, and under both; every mount in the program's view is read-only
(submounts included) but its scratch folder; memory of every kind and tasks are bounded wherever
describe_limits says so; the parent keeps a bounded amount of output; honest programs pass; a machine that
cannot isolate refuses to run code."""

import functools
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from snugtune.evaluate.cgroup import usable_hierarchies
from snugtune.evaluate.confine import BOX_FILES, SYSCALLS
from snugtune.evaluate.humaneval import load_problems, program_for
from snugtune.evaluate.sandbox import OUTPUT_BYTES, PROBE, TASKS, BoundedOutput, Confinement, SandboxUnavailable, \
    confinement_here, describe_limits, isolation_problem, run_sandboxed

ISOLATION_PROBLEM = isolation_problem()
needs_isolation = pytest.mark.skipif(ISOLATION_PROBLEM is not None, reason=f"cannot isolate here: {ISOLATION_PROBLEM}")
UNSHARE = shutil.which("unshare")
CGROUPS, CGROUP_PROBLEM = usable_hierarchies()
SRC = str(Path(__file__).resolve().parents[2] / "src")

# isolation, each with and without a cgroup: every mechanism is tried on its own where this machine has it
CONFINEMENTS = ["root+cgroup", "root", "user+cgroup", "user", "none+cgroup", "none"]


@functools.lru_cache(maxsize=None)
def _isolation_fails(isolation: str) -> str | None:
    if isolation == "root" and os.geteuid() != 0:
        return "the root isolation needs root"
    if ISOLATION_PROBLEM is not None:
        return ISOLATION_PROBLEM
    result = run_sandboxed(PROBE, confinement=Confinement(isolation, UNSHARE))
    return None if result.passed else result.detail


def confinement(name: str) -> Confinement:
    """The named confinement (see CONFINEMENTS), or a skip saying why this machine lacks it."""
    isolation, _, cgroup = name.partition("+")
    if cgroup and not CGROUPS:
        pytest.skip(f"no cgroup can be made here: {CGROUP_PROBLEM}")
    if isolation != "none" and (problem := _isolation_fails(isolation)):
        pytest.skip(f"{isolation} isolation fails here: {problem}")
    return Confinement(isolation, UNSHARE if isolation != "none" else None, CGROUPS if cgroup else (),
                       "" if cgroup else "left out by this test")


def machine_default() -> Confinement:
    return confinement_here(isolate=ISOLATION_PROBLEM is None)


# (isolate, audit_hook): both layers, the namespaces + seccomp alone, the audit hook alone
LAYERS = {
    "both": (True, True),
    "isolation-only": (True, False),
    "hook-only": (False, True),
}

# Each program exits 0 only if its escape worked; {victim} is a host file holding "secret", {outside} a
# host path that must not come to exist, {port} a host TCP listener on 127.0.0.1.
ESCAPES = {
    "rebind the hook's policy via __main__": """
import sys, os
main = sys.modules['__main__']
for name in ('BLOCKED_EVENTS', 'WRITE_EVENTS', 'READ_EVENTS'):
    setattr(main, name, ())
main.guard = lambda *args: None
main.OPEN_WRITE_FLAGS = 0
assert os.system('echo pwned > {outside}') == 0
""",
    "rewrite the hook's locals through a traceback": """
import os
try:
    open('{outside}', 'w')
except PermissionError as exc:
    tb = exc.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    rules = list(tb.tb_frame.f_locals.get('rules', ()))
    if rules:
        rules[3] = ('/',)
        tb.tb_frame.f_locals['rules'] = tuple(rules)
except OSError:
    pass
open('{outside}', 'w').write('pwned')
""",
    "rename out of the folder": "open('x', 'w').write('pwned')\nimport os\nos.rename('x', '{outside}')\n",
    "replace out of the folder": "open('x', 'w').write('pwned')\nimport os\nos.replace('x', '{outside}')\n",
    "read through a symlink": "import os\nos.symlink('{victim}', 'link')\nassert 'secret' in open('link').read()\n",
    "write through a symlink": "import os\nos.symlink('{victim}', 'link')\nopen('link', 'w').write('gone')\n",
    "truncate with O_RDONLY|O_TRUNC": "import os\nos.close(os.open('{victim}', os.O_RDONLY | os.O_TRUNC))\n",
    "read a file outside": "assert 'secret' in open('{victim}').read()\n",
    "read the machine's files": "assert 'root' in open('/etc/passwd').read()\n",
    "delete a file outside": "import os\nos.remove('{victim}')\n",
    "write into the Python install": "import os, sys\nopen(os.path.join(sys.base_prefix, 'pwned-by-sandbox'), 'w').write('x')\n",
    "os.system": "import os\nassert os.system('echo pwned > {outside}') == 0\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {outside}'], check=True)\n",
    "fork": "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n",
    "ctypes system()": "import ctypes\nassert ctypes.CDLL(None).system(b'echo pwned > {outside}') == 0\n",
    "ctypes socket()": "import ctypes\nassert ctypes.CDLL(None).socket(2, 1, 0) >= 0\n",
    "ctypes remount /usr writable": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                                     "assert libc.mount(None, b'/usr', None, 32 | 4096, None) == 0\n"),
    "network to localhost": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                             "s.sendall(b'pwned')\n"),
    "network with urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=3)\n",
}


@pytest.fixture
def host(tmp_path):
    """A secret file, a path that must stay absent, and a listener that must get no connection."""
    victim = tmp_path / "secret.txt"
    victim.write_text("secret")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    connections = []

    def accept():
        try:
            connections.append(listener.accept())
        except OSError:
            pass
    thread = threading.Thread(target=accept)
    thread.start()
    yield {"victim": victim, "outside": tmp_path / "escaped.txt", "port": listener.getsockname()[1],
           "connections": connections}
    thread.join()
    listener.close()


def _layers(name):
    isolate, _ = LAYERS[name]
    return pytest.param(name, marks=needs_isolation) if isolate else name


@pytest.mark.parametrize("layers", [_layers(n) for n in LAYERS] + ["user-namespace-only"])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_known_escapes_fail(escape, layers, host):
    if layers == "user-namespace-only":  # the other isolation, where the machine's own is root
        if machine_default().isolation != "root":
            pytest.skip("the machine's own isolation is already the user namespace (the other layers)")
        isolate, audit_hook, chosen = True, False, confinement("user")
    else:
        (isolate, audit_hook), chosen = LAYERS[layers], None
    code = ESCAPES[escape].format(victim=host["victim"], outside=host["outside"], port=host["port"])
    planted = Path(sys.base_prefix, "pwned-by-sandbox")
    result = run_sandboxed(code, timeout_s=15, isolate=isolate, audit_hook=audit_hook, confinement=chosen)
    escaped = planted.exists()
    planted.unlink(missing_ok=True)
    assert result.status == "failed", result
    assert host["victim"].read_text() == "secret"
    assert not host["outside"].exists() and not escaped
    assert not host["connections"]


HONEST = ("import math, re, collections, hashlib, random, itertools, functools, heapq, string, json, tempfile\n"
          "import threading\nfrom concurrent.futures import ThreadPoolExecutor\n"
          "with ThreadPoolExecutor(8) as pool:\n    assert list(pool.map(abs, [-1, -2] * 20)) == [1, 2] * 20\n"
          "open('x.txt', 'w').write('1')\nassert open('x.txt').read() == '1'\n"
          "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\n"
          "print('x' * 100)\n"
          "assert hashlib.sha256(b'x').hexdigest().startswith('2d71')\n")


@pytest.mark.parametrize("name", CONFINEMENTS + ["isolation-only"])
def test_honest_programs_pass(name):
    if name == "isolation-only" and ISOLATION_PROBLEM:
        pytest.skip(f"cannot isolate here: {ISOLATION_PROBLEM}")
    chosen = machine_default() if name == "isolation-only" else confinement(name)
    audit_hook = name != "isolation-only"
    assert run_sandboxed(HONEST, audit_hook=audit_hook, confinement=chosen).passed
    for problem in load_problems(5):
        program = program_for(problem, problem["canonical_solution"])
        assert run_sandboxed(program, audit_hook=audit_hook, confinement=chosen).passed, problem["task_id"]
        assert not run_sandboxed(program_for(problem, "    return None\n"), confinement=chosen).passed


@pytest.mark.slow
@needs_isolation
def test_every_canonical_humaneval_solution_passes_in_the_sandbox():
    chosen = machine_default()
    failed = [p["task_id"] for p in load_problems()
              if not run_sandboxed(program_for(p, p["canonical_solution"]), confinement=chosen).passed]
    assert failed == []


@needs_isolation
def test_the_program_sees_only_its_own_folder_and_the_python_install(tmp_path):
    (tmp_path / "users-file.txt").write_text("private")
    probe = (f"import json, os\nprint(json.dumps([sorted(os.listdir('/')), os.getcwd(), "
             f"os.path.exists({str(tmp_path / 'users-file.txt')!r}), os.path.exists({__file__!r})]))\n")
    result = run_sandboxed(probe, audit_hook=False)
    listing, cwd, sees_tmp, sees_project = json.loads(result.output)
    python_top = Path(sys.base_prefix).resolve().parts[1]
    assert cwd == "/box" and not sees_tmp and not sees_project
    assert set(listing) <= {"bin", "sbin", "lib", "lib32", "lib64", "usr", "dev", "box", python_top}


@needs_isolation
def test_a_program_that_loops_forever_or_forks_away_is_killed_at_the_wall_limit():
    result = run_sandboxed("import os\ntry:\n    os.setsid()\nexcept OSError:\n    pass\nwhile True:\n    pass\n",
                           timeout_s=2)
    assert result.status == "timeout" and result.seconds < 10


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=needs_isolation), False])
def test_limits_stop_memory_hogs_and_huge_files(isolate):
    result = run_sandboxed("x = bytearray(8 << 30)\n", memory_bytes=512 << 20, isolate=isolate)
    assert result.status == "failed" and "MemoryError" in result.detail
    big = run_sandboxed("open('big', 'wb').write(b'0' * (40 << 20))\n", isolate=isolate)
    assert big.status == "failed"


def test_no_descriptor_of_the_parent_reaches_the_program(tmp_path):
    inherited = os.open(tmp_path / "parent.txt", os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(inherited, True)
    try:
        code = f"import os\nos.write({inherited}, b'pwned')\n"
        assert not run_sandboxed(code, isolate=ISOLATION_PROBLEM is None).passed
    finally:
        os.close(inherited)
    assert (tmp_path / "parent.txt").read_text() == ""


def _fake_unshare(folder: Path) -> None:
    fake = folder / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("machine", ["no unshare", "namespaces refused"])
def test_a_machine_that_cannot_isolate_refuses_to_run_code(machine, tmp_path, monkeypatch):
    if machine == "namespaces refused":
        _fake_unshare(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="--allow-unisolated-code") as refused:
        run_sandboxed(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    assert ("not installed" if machine == "no unshare" else "Operation not permitted") in str(refused.value)
    assert not (tmp_path / "ran").exists()


# Tries to create a file in every folder the program can see but /box (and to write into /box): each
# refusal must be EROFS, the read-only mount, not a permission the program happens to lack.
WRITE_EVERYWHERE = """
import errno, json, os
found, folders, pending = {}, 0, ["/"]
while pending:
    top = pending.pop()
    folders += 1
    try:
        os.close(os.open(top + "/pwned-by-sandbox", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        found[top] = "created"
    except OSError as exc:
        if exc.errno != errno.EROFS and not (exc.errno == errno.EACCES and not os.access(top, os.X_OK)):
            found[top] = errno.errorcode.get(exc.errno, str(exc.errno))
    try:
        with os.scandir(top) as entries:
            pending += [e.path for e in entries if e.is_dir(follow_symlinks=False) and e.path != "/box"]
    except OSError:
        pass
open("/box/ok", "w").write("the scratch folder is writable")
print(json.dumps({"folders": folders, "not_read_only": found}))
"""


@needs_isolation
def test_every_folder_the_program_sees_is_read_only_but_its_scratch_folder():
    result = run_sandboxed(WRITE_EVERYWHERE, timeout_s=60, audit_hook=False, confinement=machine_default())
    assert result.passed, result
    seen = json.loads(result.output)
    assert seen["folders"] > 100 and seen["not_read_only"] == {}


# Run in a private mount namespace: mounts a writable tmpfs on folders the sandbox binds read-only (its
# submounts), lets a program write there from inside the sandbox, then reports what reached them.
SUBMOUNT_ATTACK = """
import ctypes, json, os, sys
from snugtune.evaluate.sandbox import confinement_here, run_sandboxed
libc = ctypes.CDLL(None, use_errno=True)
candidates = ("/usr/src", "/usr/games", "/usr/share/doc", "/usr/include", os.path.join(sys.base_prefix, "include"),
              os.path.join(sys.base_prefix, "share"))
needed = [os.path.realpath(p) for p in (sys.base_prefix, sys.exec_prefix)]
targets = [p for p in candidates if os.path.isdir(p) and not any(n.startswith(p) for n in needed)][:3]
for target in targets:
    assert libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, b"size=1m,mode=1777") == 0, ctypes.get_errno()
code = "import os\\n" + "".join(f"open({os.path.join(t, 'pwned')!r}, 'w').write('x')\\n" for t in targets)
result = run_sandboxed(code, audit_hook=False)
print(json.dumps({"targets": targets, "isolation": confinement_here().isolation, "status": result.status,
                  "detail": result.detail, "reached": {t: os.listdir(t) for t in targets}}))
"""


def _in_private_mounts(script: str, as_root: bool) -> dict:
    """Run a Python script in a private mount namespace (as real root no user namespace is needed) and
    return the JSON it prints last; nothing it mounts is seen outside."""
    if ISOLATION_PROBLEM is not None:
        pytest.skip(f"cannot isolate here: {ISOLATION_PROBLEM}")
    if as_root and os.geteuid() != 0:
        pytest.skip("needs root")
    prefix = [UNSHARE, "--mount"] if as_root else [UNSHARE, "--user", "--map-root-user", "--mount"]
    proc = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("made_by", ["root", "user"])
def test_a_submount_of_a_read_only_folder_is_read_only_too(made_by):
    seen = _in_private_mounts(SUBMOUNT_ATTACK, as_root=made_by == "root")
    assert seen["targets"], "no folder to mount over on this machine"
    assert seen["isolation"] == made_by
    assert seen["status"] == "failed" and "Read-only file system" in seen["detail"], seen
    assert seen["reached"] == {target: [] for target in seen["targets"]}


# Both ways of making a bound tree read-only, applied by hand in a private mount namespace: before, a bind
# with a writable submount is caught by check_read_only; after, every mount under it refuses writes while
# the original tree stays as it was.
READ_ONLY_FUNCTIONS = """
import ctypes, json, os, sys
from snugtune.evaluate import confine
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.argtypes = None
base, how = sys.argv[1], sys.argv[2]
source, bound = base + "/source", base + "/bound"
for folder in (source, bound):
    os.mkdir(folder)
confine.libc_call(libc, "mount", b"tmpfs", source.encode(), b"tmpfs", 0, b"size=1m,mode=1777")
os.mkdir(source + "/sub")
confine.libc_call(libc, "mount", b"tmpfs", (source + "/sub").encode(), b"tmpfs", 0, b"size=1m,mode=1777")
confine.libc_call(libc, "mount", source.encode(), bound.encode(), None, confine.MS_BIND | confine.MS_REC, None)
try:
    confine.check_read_only(bound, "")
    caught = ""
except OSError as exc:
    caught = str(exc)
if how == "mount_setattr":
    confine.make_read_only(libc, bound, confine.MOUNT_ATTR_NOSUID)
else:
    confine.remount_each_read_only(libc, bound)
confine.check_read_only(bound, "")
refused = []
for folder in (bound, bound + "/sub"):
    try:
        open(folder + "/x", "w")
    except OSError as exc:
        refused.append(exc.strerror)
open(source + "/sub/x", "w").write("the original stays writable")
print(json.dumps({"caught": caught, "refused": refused, "modes": [m.options[0] for m in confine.mounts_under(bound)]}))
"""


@pytest.mark.parametrize("how", ["mount_setattr", "remount each"])
def test_both_ways_of_making_a_tree_read_only_reach_its_submounts(how, tmp_path):
    seen = _in_private_mounts(READ_ONLY_FUNCTIONS.replace("sys.argv[1], sys.argv[2]", f"{str(tmp_path)!r}, {how!r}"),
                              as_root=False)
    assert "writable mounts left" in seen["caught"] and f"{tmp_path}/bound/sub" in seen["caught"]
    assert seen["refused"] == ["Read-only file system"] * 2
    assert seen["modes"] == ["ro", "ro"]


# Memory outside the address space RLIMIT_AS counts. Each program prints the MiB it holds so far.
SYSV_SHM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for held in range(32, 641, 32):
    segment = libc.shmget(0, 32 << 20, 0o1600)
    assert segment >= 0, ctypes.get_errno()
    address = libc.shmat(segment, None, 0)
    ctypes.memset(address, 1, 32 << 20)
    libc.shmdt(ctypes.c_void_p(address))
    print(held, flush=True)
"""
SYSV_MESSAGES = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
message = ctypes.create_string_buffer(8 + 8192)
held = 0
while held < 600 << 20:
    queue = libc.msgget(0, 0o1600)
    assert queue >= 0, ctypes.get_errno()
    while libc.msgsnd(queue, message, 8192, 0o4000) == 0:  # IPC_NOWAIT: until this queue is full
        held += 8192
    if held % (32 << 20) < 16384:
        print(held >> 20, flush=True)
"""
POSIX_QUEUE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
queue = libc.mq_open(b"/snugtune-test", 0o100 | 2, 0o600, None)
assert queue >= 0, ctypes.get_errno()
print(1, flush=True)
"""
MEMFD = """
import os
held, files = 0, []
for _ in range(40):
    fd = os.memfd_create("pages")
    for _ in range(15):
        os.write(fd, b"1" * (1 << 20))
    files.append(fd)
    held += 15
    print(held, flush=True)
"""
TMPFS_AND_ANONYMOUS = """
for i in range(4):
    open(f"f{i}", "wb").write(b"1" * (15 << 20))
held = bytearray(200 << 20)
for i in range(0, len(held), 4096):
    held[i] = 1
print(260, flush=True)
"""


def _isolated(c: Confinement) -> bool:
    return c.isolation != "none"


def _memory_cgroup(c: Confinement) -> bool:
    return "memory" in c.cgroup_controllers


# attack -> (program, where a limit claims to stop it). The IPC attacks run only in a private IPC namespace:
# without one their objects would outlive the program on this machine.
MEMORY_ATTACKS = {
    "System V shared memory": (SYSV_SHM, _isolated),
    "System V message queues": (SYSV_MESSAGES, _isolated),
    "POSIX message queue": (POSIX_QUEUE, _isolated),
    "memfd pages": (MEMFD, lambda c: _isolated(c) or _memory_cgroup(c)),
    "tmpfs files and anonymous memory": (TMPFS_AND_ANONYMOUS, lambda c: _isolated(c) and _memory_cgroup(c)),
}
LIMIT_MIB = 256


@pytest.mark.parametrize("name", CONFINEMENTS)
@pytest.mark.parametrize("attack", list(MEMORY_ATTACKS))
def test_memory_of_every_kind_is_bounded_where_the_eval_output_says_so(attack, name):
    chosen = confinement(name)
    program, stopped_here = MEMORY_ATTACKS[attack]
    if not stopped_here(chosen):
        if attack == "memfd pages":  # unbounded here: the eval output must say so
            assert any(m.startswith("memory cgroup") for m in describe_limits(chosen)["not_enforced"])
        return
    result = run_sandboxed(program, timeout_s=30, memory_bytes=LIMIT_MIB << 20, audit_hook=False, confinement=chosen)
    held = [int(line) for line in result.output.split()]
    assert result.status == "failed", result
    assert max(held, default=0) <= LIMIT_MIB, result


# Kernel objects a program can pile up without touching its address space; each prints how many it made.
KERNEL_OBJECTS = {
    "POSIX timers": ("""
import ctypes, platform
libc = ctypes.CDLL(None, use_errno=True)
timer, made = ctypes.c_int(), 0
number = {"x86_64": 222, "aarch64": 107}[platform.machine()]
try:
    while made < 1_000_000 and libc.syscall(number, 1, None, ctypes.byref(timer)) == 0:
        made += 1
finally:
    print(made)
""", 0),
    "empty files in the scratch folder": ("""
made = 0
try:
    while made < 1_000_000:
        open(f"f{made}", "w").close()
        made += 1
finally:
    print(made)
""", BOX_FILES),
}


@pytest.mark.parametrize("name", ["root", "user"])
@pytest.mark.parametrize("objects", list(KERNEL_OBJECTS))
def test_kernel_objects_are_refused_or_capped_under_isolation(objects, name):
    program, most = KERNEL_OBJECTS[objects]
    result = run_sandboxed(program, timeout_s=30, audit_hook=False, confinement=confinement(name))
    assert int(result.output) <= most, result


THREADS = """
import threading
threading.stack_size(64 << 10)  # small stacks: the address-space limit must not be what stops it
release = threading.Event()
started = 0
try:
    for _ in range(4000):
        threading.Thread(target=release.wait).start()
        started += 1
finally:
    print(started, flush=True)
    release.set()
"""


@pytest.mark.parametrize("name", CONFINEMENTS)
def test_tasks_are_bounded_where_the_eval_output_says_so(name):
    chosen = confinement(name)
    limits = describe_limits(chosen)
    if not any("tasks" in e for e in limits["enforced"]):
        assert any(m.startswith("task limit") for m in limits["not_enforced"])
        return
    result = run_sandboxed(THREADS, timeout_s=30, audit_hook=False, confinement=chosen)
    assert result.status == "failed" and "can't start new thread" in result.detail, result
    assert int(result.output) < TASKS


def test_the_eval_output_names_what_is_not_enforced():
    from snugtune.cli import _sandbox_note
    bare = describe_limits(Confinement("none", cgroup_problem="no cgroup here"))
    assert [m.split(" (")[0] for m in bare["not_enforced"]] == ["isolation", "memory cgroup", "task limit"]
    assert all("no cgroup here" in m for m in bare["not_enforced"][1:])
    assert _sandbox_note(bare) == "run WITHOUT isolation; not enforced here: isolation, memory cgroup, task limit"
    assert _sandbox_note(None) == "sandboxed"  # results from before the sandbox reported its limits
    if CGROUPS and ISOLATION_PROBLEM is None:
        full = describe_limits(confinement_here())
        assert full["not_enforced"] == [] and any("every kind" in e for e in full["enforced"])



# chunkings of a stream: none, empty chunks, one byte short of / at / past the bound, many random sizes
CHUNKINGS = {"nothing": [], "empty chunks": [0, 0], "one short": [OUTPUT_BYTES - 1], "exactly": [OUTPUT_BYTES],
             "one past": [OUTPUT_BYTES, 1], "a byte at a time past": [OUTPUT_BYTES - 2] + [1] * 5,
             **{f"random {seed}": [random.Random(seed).choice([0, 1, 4096, 65536, 300_000, OUTPUT_BYTES + 7])
                                   for _ in range(random.Random(seed + 100).randint(1, 12))] for seed in range(12)}}


@pytest.mark.parametrize("keep_end", [False, True])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_the_kept_output_is_exactly_the_start_or_the_end_of_the_stream(chunking, keep_end):
    sizes = CHUNKINGS[chunking]
    stream = b"".join(bytes([i % 251]) * size for i, size in enumerate(sizes))
    kept, at = BoundedOutput(keep_end=keep_end), 0
    for size in sizes:
        kept.add(stream[at:at + size])
        at += size
    expected = stream[-OUTPUT_BYTES:] if keep_end else stream[:OUTPUT_BYTES]
    assert kept.data() == expected and kept.dropped == len(stream) - len(expected)
    assert kept.kept <= OUTPUT_BYTES + max(sizes, default=0)  # never much more than the bound is held

# Prints 300 MiB on stdout and 40 MiB on stderr, then its last line.
FLOOD = """
import os
block = b"x" * (1 << 20)
for _ in range(300):
    os.write(1, block)
for _ in range(40):
    os.write(2, block)
os.write(2, b"\\nthe last line\\n")
raise SystemExit(3)
"""
# Runs FLOOD (argv[2]) from a fresh interpreter that reports how much its own peak memory grew meanwhile.
COLLECT = """
import json, resource, sys
from snugtune.evaluate.sandbox import run_sandboxed
isolate = sys.argv[1] == "isolate"
run_sandboxed("print(1)", isolate=isolate)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = run_sandboxed(sys.argv[2], timeout_s=60, isolate=isolate, audit_hook=False)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"status": result.status, "detail": result.detail, "kept": len(result.output),
                  "dropped": result.dropped_bytes, "grew_kib": grew}))
"""


def test_the_parent_keeps_a_bounded_part_of_a_flood_of_output():
    isolate = "isolate" if ISOLATION_PROBLEM is None else "none"
    proc = subprocess.run([sys.executable, "-c", COLLECT, isolate, FLOOD], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["status"] == "failed" and seen["detail"] == "the last line"
    assert seen["kept"] == OUTPUT_BYTES
    assert seen["dropped"] == 340 * (1 << 20) + len("\nthe last line\n") - 2 * OUTPUT_BYTES
    assert seen["grew_kib"] < 24 * 1024  # 340 MiB went through it


# The audit hook alone is no boundary: a program that rebinds `sys` inside the subprocess module skips the
# only audit event a subprocess raises (the C call underneath raises none) and runs a shell command.
HOOK_BYPASS = """
import subprocess, sys, types
quiet = types.ModuleType("sys")
quiet.__dict__.update(sys.__dict__)
quiet.audit = lambda *args: None
subprocess.sys = quiet
subprocess.run(["/bin/sh", "-c", "echo escaped > {outside}"], check=True)
"""


def test_the_hook_only_path_is_no_boundary_a_documented_bypass_works(tmp_path):
    outside = tmp_path / "escaped.txt"
    result = run_sandboxed(HOOK_BYPASS.format(outside=outside), isolate=False)
    assert result.passed and outside.read_text() == "escaped\n"
    if ISOLATION_PROBLEM is None:  # the same program under isolation stays inside
        outside.unlink()
        assert not run_sandboxed(HOOK_BYPASS.format(outside=outside), audit_hook=False).passed
        assert not outside.exists()


def test_no_cgroup_is_left_behind_whatever_way_the_program_ends():
    isolate = ISOLATION_PROBLEM is None
    assert run_sandboxed("print(1)", isolate=isolate).passed
    assert run_sandboxed("while True:\n    pass\n", timeout_s=1, isolate=isolate).status == "timeout"
    assert run_sandboxed(TMPFS_AND_ANONYMOUS, memory_bytes=LIMIT_MIB << 20, isolate=isolate).status == "failed"
    left = [p for h in CGROUPS for p in h.parent.glob(f"snugtune-sandbox-{os.getpid()}-*")]
    assert left == []


def test_the_seccomp_tables_refuse_the_same_calls_on_each_architecture():
    names = {arch: set(table) for arch, (_, table) in SYSCALLS.items()}
    assert names["x86_64"] - names["aarch64"] == {"fork", "vfork", "mknod", "iopl", "ioperm", "modify_ldt"}
    assert names["aarch64"] <= names["x86_64"]
    for _, table in SYSCALLS.values():
        assert len(set(table.values())) == len(table)  # no number under two names


def test_eval_says_which_sandbox_limits_hold_in_its_table_and_results(finished_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from snugtune.cli import app
    # the tiny model's answers do not matter here, only what the sandbox reports; generating them takes a minute
    monkeypatch.setattr("snugtune.evaluate.humaneval.generate", lambda model, tokenizer, prompts, *args, **kwargs:
                        ["    pass\n"] * len(prompts))
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    flags = [] if ISOLATION_PROBLEM is None else ["--allow-unisolated-code"]
    result = CliRunner().invoke(app, ["eval", str(run), "--task", "humaneval", "--limit", "1", "--device", "cpu",
                                      *flags])
    assert result.exit_code == 0, result.output
    sandbox = json.loads((run / "eval.json").read_text())["humaneval"]["sandbox"]
    assert sandbox == describe_limits(machine_default())
    missing = [m.split(" (")[0] for m in sandbox["not_enforced"]]
    expected = ("run WITHOUT isolation; " if ISOLATION_PROBLEM else "sandboxed; ") + (
        f"not enforced here: {', '.join(missing)}" if missing else "every sandbox limit enforced")
    assert expected in " ".join(result.output.split()).replace("│ ", "").replace(" │", "")
