"""The sandbox for generated code: known escapes fail under the OS isolation alone, under the audit hook
alone, and under both; honest programs pass; a machine that cannot isolate refuses to run code."""

import json
import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest

from snugtune.evaluate.humaneval import load_problems, program_for
from snugtune.evaluate.sandbox import SandboxUnavailable, isolation_problem, run_sandboxed

ISOLATION_PROBLEM = isolation_problem()
needs_isolation = pytest.mark.skipif(ISOLATION_PROBLEM is not None, reason=f"cannot isolate here: {ISOLATION_PROBLEM}")

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


@pytest.mark.parametrize("layers", [_layers(n) for n in LAYERS])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_known_escapes_fail(escape, layers, host):
    isolate, audit_hook = LAYERS[layers]
    code = ESCAPES[escape].format(victim=host["victim"], outside=host["outside"], port=host["port"])
    planted = Path(sys.base_prefix, "pwned-by-sandbox")
    result = run_sandboxed(code, timeout_s=15, isolate=isolate, audit_hook=audit_hook)
    escaped = planted.exists()
    planted.unlink(missing_ok=True)
    assert result.status == "failed", result
    assert host["victim"].read_text() == "secret"
    assert not host["outside"].exists() and not escaped
    assert not host["connections"]


@pytest.mark.parametrize("layers", [_layers(n) for n in LAYERS])
def test_honest_programs_pass(layers):
    isolate, audit_hook = LAYERS[layers]
    honest = ("import math, re, collections, hashlib, random, itertools, functools, heapq, string, json, tempfile\n"
              "import threading\nt = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
              "open('x.txt', 'w').write('1')\nassert open('x.txt').read() == '1'\n"
              "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\n"
              "assert hashlib.sha256(b'x').hexdigest().startswith('2d71')\n")
    assert run_sandboxed(honest, isolate=isolate, audit_hook=audit_hook).passed
    for problem in load_problems(5):
        program = program_for(problem, problem["canonical_solution"])
        assert run_sandboxed(program, isolate=isolate, audit_hook=audit_hook).passed, problem["task_id"]
        assert not run_sandboxed(program_for(problem, "    return None\n"), isolate=isolate).passed


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
