"""The inside of the sandbox: run as a script by evaluate/sandbox.py, under the base interpreter with -I -S
(standard library only), it reads the program from stdin, confines itself, then runs the program.

With --isolate it runs in fresh mount, network, PID, IPC and UTS namespaces made by `unshare` (plus a user
namespace where the evaluator is not root) and builds a mount view in which the host's files are not
visible: a tmpfs root holding binds of the Python install and system libraries, /dev/{null,zero,urandom},
and /box, a small tmpfs, the one writable place. Every mount in the view but /box is read-only, submounts
included (checked before the program runs). Where the evaluator is root, the program then runs as an
unprivileged uid (SANDBOX_ID). It drops every capability, sets no_new_privs and installs a seccomp filter
that refuses process creation, sockets, mounts, namespaces, ptrace, System V and POSIX IPC, memfd and
kernel-facing calls. In both modes it sets resource limits, closes inherited descriptors and adds an audit
hook whose policy is bound into it at install time (a second layer; the namespaces and seccomp are the
boundary).
"""

import collections
import ctypes
import errno
import functools
import os
import platform
import re
import resource
import struct
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, AT_RECURSIVE, AT_FDCWD = 1, 2, 4, 0x8000, -100
# statvfs flag -> mount flag: a bind mount's existing flags must be kept when remounting it read-only
KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, 1024: 1024, 2048: 2048,
              4096: 1 << 21}
BOX = "/box"
BOX_BYTES, BOX_FILES = 64 << 20, 4096  # each file and folder is kernel memory too
FILE_BYTES, DESCRIPTORS = 16 << 20, 64  # RLIMIT_FSIZE, RLIMIT_NOFILE
DEVICES = ("null", "zero", "urandom")
# The uid and gid the program runs as when the sandbox is made by root: no account uses it, so the task
# limit (RLIMIT_NPROC, which never applies to uid 0) counts only sandboxed programs and no host file is its own.
SANDBOX_ID = 2_147_483_646

# Refused system calls, by architecture: audit arch id, then name -> number. System V and POSIX IPC, memfd
# and POSIX timers are refused because what they hold lives outside the address space RLIMIT_AS counts.
SYSCALLS = {
    "x86_64": (0xC000003E, {
        "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43, "accept4": 288,
        "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
        "setns": 308, "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
        "request_key": 249, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "syslog": 103,
        "acct": 163, "quotactl": 179, "name_to_handle_at": 303, "open_by_handle_at": 304, "setsid": 112,
        "setpgid": 109, "personality": 135, "pidfd_getfd": 438, "pidfd_open": 434, "kcmp": 312, "mknod": 133,
        "mknodat": 259, "iopl": 172, "ioperm": 173, "modify_ldt": 154, "capset": 126,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66,
        "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240,
        "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
        "memfd_create": 319, "memfd_secret": 447, "timer_create": 222,
        "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {
        "socket": 198, "socketpair": 199, "connect": 203, "bind": 200, "listen": 201, "accept": 202,
        "accept4": 242, "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97,
        "setns": 268, "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
        "request_key": 218, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "syslog": 116,
        "acct": 89, "quotactl": 60, "name_to_handle_at": 264, "open_by_handle_at": 265, "setsid": 157,
        "setpgid": 154, "personality": 92, "pidfd_getfd": 438, "pidfd_open": 434, "kcmp": 272, "mknodat": 33,
        "capset": 91, "shmget": 194, "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193,
        "semctl": 191, "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187,
        "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184,
        "mq_getsetattr": 185, "memfd_create": 279, "memfd_secret": 447, "timer_create": 107,
        "clone": 220, "clone3": 435}),
}
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
EPERM, ENOSYS = 1, 38
CLONE_THREAD = 0x00010000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06

# Audit events refused outright (second layer), and those checked against the writable / readable roots.
BLOCKED_EVENTS = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
                  "os.spawn", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "webbrowser.",
                  "urllib.Request", "ftplib.", "http.", "smtplib.", "imaplib.", "poplib.", "telnetlib.",
                  "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys.settrace",
                  "sys.setprofile", "os.setns", "os.unshare", "mmap.__new__")
WRITE_EVENTS = frozenset({"os.remove", "os.unlink", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
                          "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags", "os.mkfifo",
                          "os.mknod", "shutil.rmtree", "shutil.move", "os.setxattr", "os.removexattr"})
READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.chdir", "os.getxattr", "os.listxattr"})
OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def guard(rules, event, args):
    """The audit hook's body. It reads nothing but its arguments (no globals, no closure cells), so the
    program cannot rebind its policy; `rules` is bound by functools.partial when the hook is installed."""
    (blocked, writes, reads, write_roots, read_roots, open_write_flags,
     fspath, getcwd, isinstance, str, bytes, int, PathLike, PermissionError) = rules
    if event.startswith(blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
            isinstance(flags, int) and flags & open_write_flags != 0)
        paths, roots = args[:1], write_roots if writing else read_roots
    elif event in writes:
        paths, roots = args[:2], write_roots  # both ends of rename/replace/link/symlink
    elif event in reads:
        paths, roots = args[:1], read_roots
    else:
        return
    for path in paths:
        if not isinstance(path, (str, bytes, PathLike)):
            continue  # a descriptor, a mode or times: no path to check
        text = fspath(path)
        text = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
        parts = []
        for part in (text if text.startswith("/") else getcwd() + "/" + text).split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        if not ("/" + "/".join(parts) + "/").startswith(roots):
            raise PermissionError(f"sandbox: {event} on {text} is not allowed")


def install_audit_hook(write_root: str) -> None:
    read_roots = tuple({os.path.realpath(p).rstrip("/") + "/" for p in (sys.prefix, sys.base_prefix,
                                                                         sys.exec_prefix, write_root)})
    rules = (BLOCKED_EVENTS, WRITE_EVENTS, READ_EVENTS, (write_root.rstrip("/") + "/",), read_roots,
             OPEN_WRITE_FLAGS, os.fspath, os.getcwd, isinstance, str, bytes, int, os.PathLike, PermissionError)
    sys.addaudithook(functools.partial(guard, rules))


def libc_call(libc, name: str, *args) -> None:
    # whole machine words: prctl and syscall read variadic longs
    words = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if getattr(libc, name)(*words) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


Mount = collections.namedtuple("Mount", "root point options fstype super_options")


def mount_table(text: str) -> list[Mount]:
    """The rows of a /proc/PID/mountinfo text, octal escapes (a space is \\040) decoded."""
    def unescape(field: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
    rows = []
    for line in text.splitlines():
        fields = line.split(" ")
        dash = fields.index("-", 6)  # optional fields end at the lone dash
        rows.append(Mount(unescape(fields[3]), unescape(fields[4]), fields[5].split(","), fields[dash + 1],
                          fields[dash + 3].split(",")))
    return rows


def mounts_under(folder: str) -> list[Mount]:
    """This process's mounts at folder and below it, outermost first."""
    with open("/proc/self/mountinfo") as table:
        rows = mount_table(table.read())
    return [m for m in rows if m.point == folder or m.point.startswith(folder.rstrip("/") + "/")]


def remount_each_read_only(libc, target: str) -> None:
    """Read-only for the mount at target and each one below it, one by one (kernels before mount_setattr)."""
    for mount in mounts_under(target):
        kept = sum(flag for st, flag in KEPT_FLAGS.items() if os.statvfs(mount.point).f_flag & st)
        libc_call(libc, "mount", None, mount.point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None)


def make_read_only(libc, target: str, attributes: int) -> None:
    """Read-only (plus attributes) for the mount at target and every mount below it: one mount_setattr with
    AT_RECURSIVE where the kernel has it (5.12+), else a remount of each; a remount of the top alone would
    leave submounts writable."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | attributes, 0, 0, 0)  # set, clear, propagation, userns fd
    try:
        libc_call(libc, "syscall", SYSCALLS[platform.machine()][1]["mount_setattr"], AT_FDCWD, target.encode(),
                  AT_RECURSIVE, ctypes.create_string_buffer(attr, len(attr)), len(attr))
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: container seccomp profiles of new calls
            raise
        remount_each_read_only(libc, target)


def bind_read_only(libc, source: str, target: str, attributes: int) -> None:
    libc_call(libc, "mount", source.encode(), target.encode(), None, MS_BIND | MS_REC, None)
    make_read_only(libc, target, attributes)


def check_read_only(new_root: str, writable: str) -> None:
    """Refuse to run anything if a mount in the view other than `writable` is still writable."""
    left = [m.point for m in mounts_under(new_root) if "rw" in m.options and m.point != writable]
    if left:
        raise OSError(f"writable mounts left in the sandbox's view: {', '.join(left[:5])}")


def build_mount_view(libc, new_root: str, read_only: list[str], owner: int | None) -> None:
    """Make new_root (an empty folder) this mount namespace's root: the listed folders read-only, the
    system's top-level links, three device files, and the writable tmpfs /box (owned by `owner` where
    given); every other mount read-only, checked; the old root detached."""
    new_root = os.path.realpath(new_root)  # mountinfo shows resolved paths
    libc_call(libc, "mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    libc_call(libc, "mount", b"tmpfs", new_root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
    for name in ("bin", "lib", "lib64", "lib32", "sbin"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), f"{new_root}/{name}")
        elif os.path.isdir("/" + name):
            read_only.append("/" + name)
    for folder in read_only:
        os.makedirs(new_root + folder, exist_ok=True)
        bind_read_only(libc, folder, new_root + folder, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    os.mkdir(f"{new_root}/dev")
    for name in DEVICES:
        open(f"{new_root}/dev/{name}", "w").close()
        bind_read_only(libc, f"/dev/{name}", f"{new_root}/dev/{name}", MOUNT_ATTR_NOSUID)
    os.mkdir(new_root + BOX)
    ownership = "" if owner is None else f",uid={owner},gid={owner}"
    libc_call(libc, "mount", b"tmpfs", (new_root + BOX).encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
              f"size={BOX_BYTES},nr_inodes={BOX_FILES},mode=700{ownership}".encode())
    libc_call(libc, "mount", None, new_root.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
              None)
    check_read_only(new_root, new_root + BOX)
    os.chdir(new_root)
    libc_call(libc, "syscall", SYSCALLS[platform.machine()][1]["pivot_root"], b".", b".")
    libc_call(libc, "umount2", b".", 2)  # MNT_DETACH: the host's tree is gone from this namespace
    os.chdir("/")


def drop_capabilities(libc) -> None:
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)     # effective, permitted, inheritable: all zero
    libc_call(libc, "syscall", SYSCALLS[platform.machine()][1]["capset"], header, data)


def seccomp_program(arch: str) -> bytes:
    """Classic BPF: kill on a foreign architecture; EPERM for the refused calls and for clone without
    CLONE_THREAD (threads still work); ENOSYS for clone3 so the C library falls back to clone."""
    audit_arch, numbers = SYSCALLS[arch]
    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    prog = [op(LD_ABS, 4), op(JEQ, audit_arch, 1, 0), op(RET, RET_KILL_PROCESS), op(LD_ABS, 0)]
    if arch == "x86_64":
        prog += [op(JGE, 0x40000000, 0, 1), op(RET, RET_ERRNO | EPERM)]  # the x32 calling convention
    prog += [op(JEQ, numbers["clone3"], 0, 1), op(RET, RET_ERRNO | ENOSYS)]
    for name, number in numbers.items():
        if name not in ("clone", "clone3"):
            prog += [op(JEQ, number, 0, 1), op(RET, RET_ERRNO | EPERM)]
    prog += [op(JEQ, numbers["clone"], 0, 4), op(LD_ABS, 16), op(JSET, CLONE_THREAD, 0, 1), op(RET, RET_ALLOW),
             op(RET, RET_ERRNO | EPERM), op(RET, RET_ALLOW)]
    return b"".join(prog)


def install_seccomp(libc) -> None:
    program = ctypes.create_string_buffer(seccomp_program(platform.machine()))
    fprog = struct.pack("HxxxxxxP", len(program.raw) // 8, ctypes.addressof(program))
    libc_call(libc, "prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc_call(libc, "prctl", 22, 2, fprog, 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def set_limits(memory: int, cpu_seconds: int, tasks: int) -> None:
    """tasks: RLIMIT_NPROC (0: unset). It counts the tasks of this uid, in its user namespace where there is
    one, and never applies to uid 0: only meaningful for an unprivileged uid of the sandbox's own."""
    limits = [(resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, FILE_BYTES),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, DESCRIPTORS), (resource.RLIMIT_MSGQUEUE, 0)]
    for limit, value in limits + ([(resource.RLIMIT_NPROC, tasks)] if tasks else []):
        resource.setrlimit(limit, (value, value))


def become(uid: int) -> None:
    """Leave root for an unprivileged uid and gid (which also empties the capability sets)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def confine(isolate: bool, place: str, memory: int, cpu_seconds: int, tasks: int, run_as: int | None,
            audit_hook: bool) -> str:
    """Confine this process; returns the folder the program runs in. run_as: the uid to become once the
    mount view is built (the sandbox was made by root without a user namespace)."""
    if isolate:
        if platform.machine() not in SYSCALLS:
            raise OSError(f"no seccomp table for {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.argtypes = None
        build_mount_view(libc, place, sorted({"/usr", *map(os.path.realpath, (sys.base_prefix, sys.exec_prefix))}),
                         run_as)
        if run_as is not None:
            become(run_as)
        drop_capabilities(libc)
        install_seccomp(libc)
        place = BOX
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, 1 << 16)  # nothing inherited: only stdin (/dev/null), stdout and stderr stay open
    set_limits(memory, cpu_seconds, tasks)
    os.chdir(place)
    os.environ.update(HOME=place, TMPDIR=place)
    if audit_hook:
        install_audit_hook(place)
    return place


def main() -> None:
    isolate, audit_hook = sys.argv[1] == "--isolate", sys.argv[2] == "--audit-hook"
    place, memory, cpu_seconds, tasks = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    run_as = None if sys.argv[7] == "-" else int(sys.argv[7])
    source = sys.stdin.buffer.read().decode("utf-8")
    try:
        confine(isolate, place, memory, cpu_seconds, tasks, run_as, audit_hook)
    except OSError as exc:
        sys.stderr.write(f"sandbox setup failed: {exc}\n")
        sys.exit(97)
    program = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source, "program.py", "exec"), program)


if __name__ == "__main__":
    main()
