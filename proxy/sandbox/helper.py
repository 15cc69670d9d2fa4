"""The sandbox helper: runs as a script in a fresh interpreter and builds the sandbox from inside.

``python -I -S helper.py CONFIG``: stdlib only, no site, no environment influence; it must not import
anything from this package (it is not importable from the script) and stays small because its start-up
is part of every ``egress run``. See ``namespace.py`` for the design and the protocol.

Process tree: launcher -> this helper (new user/net/mount namespaces; relays signals and the exit
status) -> init (PID 1 of a new PID namespace: mounts, listeners, handshake, reaps) -> the command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys

TYPE_CHECKING = False  # typing's constant without importing typing (stdlib only, run with -S)
if TYPE_CHECKING:
    from typing import Any, NoReturn

_EXIT_SETUP_FAILED = 125  # kept in sync by hand with proxy/sandbox/__init__.py
_EXIT_NOT_EXECUTABLE = 126
_EXIT_NOT_FOUND = 127

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP = 0x1
_NETLINK_SOCK_DIAG = 4
_FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def own_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class _SetupFailed(Exception):
    def __init__(self, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.hint = hint


_libc: Any = None


def preload() -> None:
    """What the helper, init and the command's process would otherwise import after the fork: the
    launcher loads it just before it forks the helper (ForkedHelper.start). Importing in a forked
    child costs several times more (every page it touches is copied), and three processes would."""
    import warnings  # noqa: F401 - os.execvp's PATH search imports it in the command's process

    _c()


def _c() -> Any:
    """libc, for the calls os does not wrap (loaded before the fork: see :func:`preload`)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, *([ctypes.c_ulong] * 4)]
    return _libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = os.fsencode
    rc = _c().mount(
        enc(source) if source else None, enc(target), enc(fstype) if fstype else None, flags, None
    )
    if rc != 0:
        err = _errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _c().umount2(os.fsencode(target), _MNT_DETACH) != 0:
        err = _errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    if _c().prctl(option, arg, arg3, 0, 0) != 0:
        err = _errno()
        raise OSError(err, os.strerror(err))


def _userns_hint(err: int) -> str:
    if err == errno.ENOSPC:
        return (
            "the user namespace limit is reached: raise /proc/sys/user/max_user_namespaces "
            "(it may be 0), or run egress as root"
        )
    return (
        "unprivileged user namespaces are not allowed here. Check "
        "/proc/sys/kernel/unprivileged_userns_clone (Debian: must be 1), "
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns (Ubuntu >= 23.10: 0, or an AppArmor "
        "profile allowing userns for this Python), /proc/sys/user/max_user_namespaces (> 0); inside a "
        "container allow unshare (Docker: --security-opt seccomp=unconfined, or "
        "--cap-add SYS_ADMIN); or run egress as root. Use --no-isolation only if you accept that the "
        "command can bypass the gate"
    )


def _write(path: str, text: str) -> None:
    """The whole text in one write(2), as the id maps require, with no file object around it."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, f"short write to {path}")
    finally:
        os.close(fd)


def _enter_namespaces(config: dict[str, Any]) -> None:
    """unshare user+net+mount+PID (and IPC and UTS: the host's System V shared memory, semaphores
    and message queues, and its host name, are not the command's) and map our own uid and gid to
    themselves."""
    uid, gid = os.geteuid(), os.getegid()
    flags = os.CLONE_NEWUSER | os.CLONE_NEWNET | os.CLONE_NEWNS | os.CLONE_NEWPID
    flags |= os.CLONE_NEWIPC | os.CLONE_NEWUTS
    try:
        os.unshare(flags)
    except OSError as exc:
        raise _SetupFailed(
            f"cannot create the sandbox namespaces (unshare: {exc.strerror})",
            _userns_hint(exc.errno or 0),
        ) from exc
    try:
        # One id each, mapped to itself: a process may map its own ids without privilege in the
        # parent namespace, so root and unprivileged users take the same path.
        _write("/proc/self/setgroups", "deny\n")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as exc:
        raise _SetupFailed(f"cannot write the user namespace id maps: {exc}") from exc
    if own_netns_inode() == int(config["netns"]):
        raise _SetupFailed("unshare(CLONE_NEWNET) left us in the host's network namespace")


def _setup_mounts(config: dict[str, Any]) -> str:
    """Private mount tree, a fresh /proc for the new PID namespace, our resolv.conf."""
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    except OSError as exc:
        raise _SetupFailed(f"cannot make the sandbox's mounts private: {exc}") from exc
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError as exc:
        raise _SetupFailed(
            f"cannot mount a private /proc in the sandbox: {exc}",
            "the host /proc must be fully visible (no masked paths, e.g. Docker without "
            "--security-opt systempaths=unconfined); without it processes inside could reach host "
            "processes",
        ) from exc
    text = config.get("resolv_conf")
    if not text:
        return "unchanged"
    if not os.path.exists("/etc/resolv.conf"):
        return "absent (glibc then uses 127.0.0.1)"
    # A bind source must live in our mount namespace (a memfd does not): write the file on a small
    # tmpfs mounted briefly over /tmp, bind it, then detach the tmpfs. Nothing touches the disk.
    scratch = next(d for d in ("/tmp", "/mnt", "/run", "/var/tmp", "/dev") if os.path.isdir(d))
    try:
        _mount("egress", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        try:
            path = os.path.join(scratch, "resolv.conf")
            _write(path, text)
            os.chmod(path, 0o444)
            _mount(path, "/etc/resolv.conf", None, _MS_BIND)
        finally:
            _umount(scratch)
    except OSError as exc:
        raise _SetupFailed(f"cannot bind-mount the sandbox's /etc/resolv.conf: {exc}") from exc
    with contextlib.suppress(OSError):  # read-only is a nicety: no other nameserver has a route
        _mount(None, "/etc/resolv.conf", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    return "bound"


def _close_user_namespaces() -> None:
    """No user namespace can be created inside the sandbox (its ``max_user_namespaces``, which
    counts for the sandbox's own user namespace and every one below it, set to 0 while init still
    has the capability to): for a policy that binds rules to executables. A process that creates one
    holds every capability there, and ``prctl(PR_SET_MM, PR_SET_MM_MAP)`` with an ``exe_fd`` then
    points its executable link, which is what such a rule checks, at any file it can open:
    ``/proc/PID/exe`` would name the bound program, device and inode included, for a process
    that never ran it (a child created with ``CLONE_VM`` into a user namespace of its own does it
    for its parent, which stays in the sandbox's). Runs before ``/proc/sys`` is made read-only."""
    try:
        _write("/proc/sys/user/max_user_namespaces", "0\n")
    except OSError as exc:
        raise _SetupFailed(
            f"cannot stop the sandbox from creating user namespaces, which a policy that binds "
            f"rules to executables needs: {exc}"
        ) from exc


def _hide(paths: list[str]) -> None:
    """Cover each path with an empty read-only mount: a directory with a tmpfs, a file with
    /dev/null. The command cannot undo it (no capabilities, no_new_privs)."""
    for path in paths:
        try:
            if os.path.isdir(path):
                flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
                _mount("egress-hidden", path, "tmpfs", flags)
            elif os.path.lexists(path):
                _mount("/dev/null", path, None, _MS_BIND)
                _mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
        except OSError as exc:
            raise _SetupFailed(f"cannot hide {path} from the sandbox: {exc}") from exc


# The kernel's settings and the host's name table, read-only in every sandbox. Their permission checks
# key on the file owner's uid, not on capabilities: a command launched by root (its uid mapped to
# itself) could otherwise write host-wide sysctls (core_pattern runs a program as root), cgroup
# limits of other processes, /proc/sysrq-trigger, and /etc/hosts, which the gate itself reads to
# resolve names. /sys is bound with every mount below it (the cgroup hierarchies).
_KERNEL_FILES = (
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/sys",
    "/etc/hosts",
)

# statvfs f_flag -> mount flag, for the flags a bind remount must keep (the kernel refuses to
# clear them on mounts inherited from a more privileged namespace).
_KEPT = ((2, 0x2), (4, 0x4), (8, 0x8), (1024, 0x400), (2048, 0x800), (4096, 1 << 21))


def _pin_ancestors(paths: list[str]) -> None:
    """Make every directory above a path kept read-only or hidden a mount point (bound onto itself,
    writable, with what lies below it), up to the nearest one that already is. The kernel refuses
    to rename a mount point, but not a directory that holds one: a command could otherwise rename
    the parent of the gate's virtual environment (or of the journal, a policy file, /etc) away,
    mount and all, and put a directory of its own making at the old path for the next run to
    read; or the parent of the hidden state directory, and make the gate's own state (the
    approved rules it reads, the token and channel it writes) its own."""
    points = set(_mount_points())
    pinned: set[str] = set()
    for path in paths:
        above: list[str] = []
        parent = os.path.dirname(os.path.abspath(path))
        while parent not in points and parent not in pinned and parent != "/":
            above.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(above):  # the outermost first: each bind carries those below
            try:
                _mount(directory, directory, None, _MS_BIND | _MS_REC)
            except OSError as exc:
                raise _SetupFailed(f"cannot pin {directory} in the sandbox: {exc}") from exc
            pinned.add(directory)


def _freeze(paths: list[str]) -> None:
    """Make each path read-only inside the sandbox (a read-only bind mount on itself): files that
    rules are bound to, the files the run's policy was read from, and the gate's installation,
    which a sandbox running as their owner could otherwise rewrite. A directory is bound with every
    mount below it (a hidden path stays hidden) and each of those is made read-only too. A mount
    point cannot be renamed over or unlinked either; the command cannot undo it."""
    below: list[str] | None = None
    tree_calls = True
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if tree_calls:
                    try:
                        _freeze_tree(path)
                        continue
                    except _NoTreeCalls:
                        tree_calls = False
                _mount(path, path, None, _MS_BIND | _MS_REC)
                if below is None:
                    below = _mount_points()
                for point in [p for p in below if p.startswith(path.rstrip("/") + "/")]:
                    _read_only(point)
            else:
                _mount(path, path, None, _MS_BIND)
            _read_only(path)
        except OSError as exc:
            raise _SetupFailed(f"cannot make {path} read-only in the sandbox: {exc}") from exc


class _NoTreeCalls(Exception):
    """The kernel has no open_tree/mount_setattr (before Linux 5.12): bind and remount instead."""


# The mount API of Linux 5.2 and 5.12; asm-generic's numbers, which x86 and arm64 share.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _AT_RECURSIVE, _AT_EMPTY_PATH = 0x1, 0x8000, 0x1000
_MOVE_MOUNT_F_EMPTY_PATH, _MOUNT_ATTR_RDONLY, _AT_FDCWD = 0x4, 0x1, -100


def _freeze_tree(path: str) -> None:
    """A read-only copy of the mount tree at ``path``, put over it: one clone of the tree with
    every mount below it, made read-only as a whole, then moved in place (three calls, however
    many mounts there are below: ``/sys`` has a dozen cgroup hierarchies)."""
    import ctypes

    libc, enc, long = _c(), os.fsencode(path), ctypes.c_long  # syscall(2) reads longs
    flags = _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC
    fd = libc.syscall(long(_SYS_OPEN_TREE), long(_AT_FDCWD), enc, long(flags))
    if fd < 0:
        err = _errno()
        if err in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that forbids it
            raise _NoTreeCalls
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    try:
        attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY, 0, 0, 0)
        at = long(_AT_EMPTY_PATH | _AT_RECURSIVE)
        if libc.syscall(long(_SYS_MOUNT_SETATTR), long(fd), b"", at, attr, long(len(attr))):
            err = _errno()
            if err in (errno.ENOSYS, errno.EPERM):
                raise _NoTreeCalls
            raise OSError(err, f"mount_setattr {path}: {os.strerror(err)}")
        moved = long(_MOVE_MOUNT_F_EMPTY_PATH)
        if libc.syscall(long(_SYS_MOVE_MOUNT), long(fd), b"", long(_AT_FDCWD), enc, moved):
            err = _errno()
            raise OSError(err, f"move_mount {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _read_only(path: str) -> None:
    kept = 0
    flags = os.statvfs(path).f_flag
    for st_flag, ms_flag in _KEPT:
        if flags & st_flag:
            kept |= ms_flag
    _mount(None, path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | kept)


def _mount_points() -> list[str]:
    """Every mount point in this mount namespace (``mountinfo``'s fifth field, octal escapes
    undone)."""
    with open("/proc/self/mountinfo", "rb") as info:
        lines = info.read().splitlines()
    points = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            points.append(os.fsdecode(_unescape(fields[4])))
    return points


def _unescape(raw: bytes) -> bytes:
    """``mountinfo`` writes a space, tab, newline or backslash in a path as ``\\ooo`` (no ``re``:
    this runs in every ``egress run``)."""
    first, *rest = raw.split(b"\\")
    return first + b"".join(bytes([int(part[:3], 8)]) + part[3:] for part in rest)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _listeners(config: dict[str, Any]) -> list[socket.socket]:
    made: list[socket.socket] = []
    for name, kind, port in config["listeners"]:
        try:
            made.append(_listener(kind, int(port)))
        except OSError as exc:
            for sock in made:
                sock.close()
            raise _SetupFailed(
                f"cannot create the {name} listener inside the sandbox: {exc}"
            ) from exc
    return made


def _listener(kind: str, port: int) -> socket.socket:
    if kind == "diag":  # sock_diag, answering about this namespace's sockets (process attribution)
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, sock_type)
    try:
        # No SO_REUSEPORT: nothing inside may bind a second socket to the gate's port.
        sock.bind(("127.0.0.1", port))
        if sock_type == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _fail(ctl: socket.socket, error: str, hint: str = "") -> None:
    with contextlib.suppress(OSError):
        ctl.sendall(json.dumps({"ok": False, "error": error, "hint": hint}).encode())
    os._exit(_EXIT_SETUP_FAILED)


def _helper_main(config: dict[str, Any], env: dict[str, str] | None = None) -> None:
    ctl = socket.socket(fileno=int(config["ctl"]))
    os.set_inheritable(ctl.fileno(), False)
    with contextlib.suppress(OSError):
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(config["parent"]):
        os._exit(_EXIT_SETUP_FAILED)  # the launcher is already gone
    try:
        _enter_namespaces(config)
    except _SetupFailed as exc:
        _fail(ctl, exc.error, exc.hint)
    # Held, not lost, until each side of the fork has its handlers: a signal that came before
    # would end the helper (its default action) while the command runs on, or reach init unhandled.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid == 0:
        try:
            _init_main(config, ctl, env)
        finally:
            os._exit(_EXIT_SETUP_FAILED)
    ctl.close()
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _init_main(config: dict[str, Any], ctl: socket.socket, env: dict[str, str] | None) -> None:
    with contextlib.suppress(OSError):
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        resolv = _setup_mounts(config)
        if config.get("close_userns"):
            _close_user_namespaces()
        frozen = [p for p in _KERNEL_FILES if os.path.lexists(p)] + (config.get("freeze") or [])
        hidden = config.get("hide") or []
        _pin_ancestors(frozen + [p for p in hidden if os.path.lexists(p)])
        _hide(hidden)
        _freeze(frozen)
        _loopback_up()
        socks = _listeners(config)
    except _SetupFailed as exc:
        _fail(ctl, exc.error, exc.hint)
    except OSError as exc:
        _fail(ctl, f"cannot set up the sandbox: {exc}")
    info = {"ok": True, "netns": own_netns_inode(), "resolv_conf": resolv}
    socket.send_fds(ctl, [json.dumps(info).encode()], [s.fileno() for s in socks])
    for s in socks:
        s.close()
    # While the launcher checks the listeners (and hands them to a running gate): the command's process
    # inherits what init gives up here (it must not start with any capability it could keep).
    try:
        _drop_privileges()
        dropped = ""
    except OSError as exc:
        dropped = f"egress run: cannot drop privileges for the command: {exc}\n"
    if not dropped and not _forbid_terminal_injection():
        config = {**config, "tty": None, "new_session": True}
    pending: list[int] = []
    child = 0

    def on_signal(sig: int, _frame: object) -> None:
        if child:
            try:
                os.kill(-child, sig)  # the command's whole process group, as a terminal would
            except ProcessLookupError:
                _forward(child, sig)
        else:
            pending.append(sig)

    # Before "go": the launcher forwards signals from the moment it releases the command, and a
    # signal that came with no handler would be dropped (the default action of a PID namespace's
    # init is to ignore it), leaving the command to run to its end.
    for sig in _FORWARDED:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # (blocked by the helper's fork)
    ctl.settimeout(None)
    try:
        go = ctl.recv(1)
    except OSError:
        go = b""
    ctl.close()
    if go != b"G":
        os._exit(_EXIT_SETUP_FAILED)
    if dropped:
        sys.stderr.write(dropped)
        os._exit(_EXIT_SETUP_FAILED)
    if pending:  # stopped as it was released: the command never starts
        os._exit(128 + pending[0])
    child = _start_command(config, env)
    if pending:
        os.kill(-child, pending[0])
    while True:  # reap everything; leave when the command exits (the kernel kills the rest)
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def _drop_privileges() -> None:
    """Whatever uid we run as inside, the command gets no capabilities and cannot gain any: init
    empties its capability bounding set and ambient set and sets no_new_privs before it forks the
    command, whose process inherits all three (and keeps them across ``execve``)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


# The terminal ioctls that push input into a terminal (TIOCSTI: "simulate terminal input") or paste
# a console's selection into it (TIOCLINUX), <asm-generic/ioctls.h>: the command's session still
# has the terminal of whoever ran ``egress run`` as its controlling terminal (``/dev/tty`` opens it
# even when no standard stream is a terminal), and the kernel lets a process push input into its own
# controlling terminal without any capability. What it pushed is read after the run by the shell
# that started it, outside the sandbox, as if the user had typed it.
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
# Per machine: (AUDIT_ARCH_*, the ioctl syscall numbers under it), each ABI the kernel runs there.
# x86_64 runs i386 code too (int 0x80) and, where enabled, x32 (numbers with bit 30 set).
_IOCTL_SYSCALLS: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {
    "x86_64": ((0xC000003E, (16, 0x40000000 | 16, 0x40000000 | 514)), (0x40000003, (54,))),
    "aarch64": ((0xC00000B7, (29,)), (0x40000028, (54,))),
}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_SECCOMP_SYSCALL = {"x86_64": 317, "aarch64": 277}  # seccomp(2)
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 1 << 2
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06


def _terminal_injection_filter(machine: str) -> list[tuple[int, int, int, int]] | None:
    """A seccomp program (``struct sock_filter`` entries) that fails ``ioctl(TIOCSTI)`` and
    ``ioctl(TIOCLINUX)`` with EPERM under every ABI of ``machine`` and allows everything else;
    None for a machine without a table here. ``seccomp_data``: nr at 0, arch at 4, the low half of
    args[1] (the ioctl's request, an ``unsigned int``) at 24 on these little-endian machines."""
    abis = _IOCTL_SYSCALLS.get(machine)
    if abis is None:
        return None
    # Jumps name their targets (None: the next instruction); ``offset`` turns them into the
    # forward offsets BPF wants. Each ABI's block checks its architecture, then its numbers.
    code: list[tuple[str, int, int, str | None, str | None]] = []  # label, op, k, jt, jf
    for index, (arch, numbers) in enumerate(abis):
        following = f"abi{index + 1}" if index + 1 < len(abis) else "allow"
        code.append((f"abi{index}", _BPF_LD_W_ABS, 4, None, None))
        code.append(("", _BPF_JEQ_K, arch, None, following))
        code.append(("", _BPF_LD_W_ABS, 0, None, None))
        code.extend(("", _BPF_JEQ_K, number, "check", None) for number in numbers)
        code.append(("", _BPF_JEQ_K, 0, "allow", "allow"))  # an unconditional jump
    code.append(("check", _BPF_LD_W_ABS, 24, None, None))
    code.append(("", _BPF_JEQ_K, _TIOCSTI, "deny", None))
    code.append(("", _BPF_JEQ_K, _TIOCLINUX, "deny", "allow"))
    code.append(("deny", _BPF_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM, None, None))
    code.append(("allow", _BPF_RET_K, _SECCOMP_RET_ALLOW, None, None))
    at = {label: index for index, (label, *_) in enumerate(code) if label}

    def offset(index: int, target: str | None) -> int:
        return 0 if target is None else at[target] - index - 1

    return [
        (op, offset(index, jt), offset(index, jf), k)
        for index, (_, op, k, jt, jf) in enumerate(code)
    ]


def _forbid_terminal_injection() -> bool:
    """Install :func:`_terminal_injection_filter` for this process and everything it starts (after
    ``no_new_privs``, which an unprivileged filter needs; nothing the command does removes it);
    False where that is not possible (another machine, a kernel without seccomp filters): the
    command then starts in a session of its own, without a controlling terminal."""
    import ctypes

    program = _terminal_injection_filter(os.uname().machine)
    if program is None:
        return False
    raw = b"".join(struct.pack("=HBBI", *entry) for entry in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    holder = ctypes.create_string_buffer(fprog, len(fprog))
    # seccomp(2) with SECCOMP_FILTER_FLAG_SPEC_ALLOW: a filter installed without it turns on the
    # kernel's speculation mitigations (SSBD, STIBP) for every process under it on kernels whose
    # default is spec_store_bypass_disable=seccomp (before 5.16), which costs the command's own
    # work, compilers and package managers included. prctl is the fallback: a kernel before 4.17
    # refuses the flag (EINVAL), one without the system call answers ENOSYS.
    number = _SECCOMP_SYSCALL.get(os.uname().machine)
    if number is not None:
        libc = _c()
        if (
            libc.syscall(
                ctypes.c_long(number),
                ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                ctypes.c_ulong(_SECCOMP_FILTER_FLAG_SPEC_ALLOW),
                ctypes.c_void_p(ctypes.addressof(holder)),
            )
            == 0
        ):
            return True
    try:
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(holder))
    except OSError:
        return False
    return True


def _start_command(config: dict[str, Any], env: dict[str, str] | None) -> int:
    """The command's process; its pid. Without a terminal to hand over, ``posix_spawnp`` gives
    it all it needs (default signals, an empty mask, its own process group) without copying
    init's address space: ~2.5 ms off every ``egress run``, measured against a fork of the
    interpreter. With a terminal, a fork, whose child makes its group the terminal's foreground
    before the command runs. Either way it inherits init's empty capability sets and
    ``no_new_privs``; init reports a command that cannot be run (127 or 126), as the fork did.
    glibc's spawn leaves its two internal signals (32 and 33) ignored in the command: glibc and
    musl install their handlers for them when they use them."""
    if config.get("tty") is not None:
        child = os.fork()
        if child == 0:
            _exec_command(config, env)
        return child
    argv: list[str] = config["argv"]
    if env is not None:  # posix_spawnp searches this process's PATH: make it the command's
        if "PATH" in env:
            os.environ["PATH"] = env["PATH"]
        else:
            os.environ.pop("PATH", None)
    try:
        if config.get("new_session"):
            return os.posix_spawnp(
                argv[0],
                argv,
                os.environ if env is None else env,
                setsid=True,
                setsigmask=(),
                setsigdef=(*_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ),
            )
        return os.posix_spawnp(
            argv[0],
            argv,
            os.environ if env is None else env,
            setpgroup=0,
            setsigmask=(),
            setsigdef=(*_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as exc:
        _not_run(argv[0], exc)


def _not_run(command: str, exc: OSError) -> NoReturn:
    """The command could not be started: 127 when it was not found, else 126 (as a shell says)."""
    if isinstance(exc, FileNotFoundError):
        sys.stderr.write(f"egress run: {command}: command not found\n")
        os._exit(_EXIT_NOT_FOUND)
    sys.stderr.write(f"egress run: {command}: {exc.strerror}\n")
    os._exit(_EXIT_NOT_EXECUTABLE)


def _exec_command(config: dict[str, Any], env: dict[str, str] | None) -> None:
    """In the command's process (a fork of init, without capabilities since init dropped them):
    signals as a fresh process has them, its own process group, the terminal, then ``execvp``."""
    argv: list[str] = config["argv"]
    try:
        for sig in (*_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; the command must not
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)
        tty = config.get("tty")
        if tty is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            with contextlib.suppress(OSError):
                os.tcsetpgrp(int(tty), os.getpgrp())
            signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    except OSError as exc:
        sys.stderr.write(f"egress run: cannot prepare the command's process: {exc}\n")
        os._exit(_EXIT_SETUP_FAILED)
    try:
        if env is None:  # run as a script: its environment is the command's
            os.execvp(argv[0], argv)
        else:
            os.execvpe(argv[0], argv, env)
    except OSError as exc:
        _not_run(argv[0], exc)


def run_helper(config: dict[str, Any], env: dict[str, str]) -> None:
    """Entry point when the launcher forks instead of starting this file as a script: ``env`` is the
    command's environment (not this process's, left as it is); never returns (every path ends in
    ``os._exit``)."""
    _helper_main(config, env)


if __name__ == "__main__":
    _helper_main(json.loads(sys.argv[1]))
