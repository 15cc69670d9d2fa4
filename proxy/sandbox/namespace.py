"""Create a sandbox (user + network + mount + PID namespaces) and hand its listeners to the gate.

Why this shape:

- A socket's network namespace is fixed when it is created. So the proxy and DNS listeners are
  created by a process *inside* the new network namespace and passed to the launcher over
  SCM_RIGHTS; the gate then accepts on them directly. No veth, no firewall rules, no relay, no
  root needed, and nothing of the host (its loopback services included) is reachable inside.
- ``unshare(CLONE_NEWUSER)`` needs a single-threaded caller and the launcher runs an event loop and
  mitmproxy, so the namespaces are made by a fresh interpreter running ``helper.py`` as a script
  (``python -I -S helper.py``: stdlib only, no site, no environment influence).
- A user namespace is made even when we are root: the sandbox's network namespace is then owned by
  that user namespace, so whatever capabilities a process inside holds apply only to its own empty
  network, never the host's. The command additionally runs with an empty capability bounding set and
  ``no_new_privs`` so root inside cannot unmount the private ``/proc`` (which would show host
  processes to ptrace or to open ``/proc/PID/mem`` of).
- A PID namespace makes "nothing is left behind" a kernel guarantee: when its init (a tiny loop in
  ``helper.py``) exits, every process inside is killed, and the network namespace dies with them.

Process tree: launcher (host netns; this module) -> helper (new userns/netns/mntns; relays signals
and the exit status) -> init (PID 1: mounts, listeners, handshake, reaps) -> the command (its own
process group, foreground on the terminal when the launcher was).

Protocol on the control socket (AF_UNIX socketpair, launcher <-> init): init sends one JSON message
``{"ok": true, ...}`` with the listener fds attached (or ``{"ok": false, "error": ..., "hint": ...}``),
then waits for one byte: ``G`` runs the command (unless a signal was forwarded to init first: it
then exits 128+N without running it), anything else or EOF exits without running it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys

from proxy.sandbox import EXIT_SETUP_FAILED

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:  # imported where used: a launch that forks the helper never loads subprocess
    import subprocess
    from collections.abc import Iterator, Mapping, Sequence
    from typing import IO, Any

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helper.py")
_SIOCGSKNS = 0x894C
_MAX_MESSAGE = 65536

RESOLV_CONF = (
    "# written by `egress run`: the sandbox's only resolver is the egress DNS gate\n"
    "nameserver 127.0.0.1\n"
)


class SandboxError(Exception):
    """Isolation could not be set up; the command was not run. ``hint`` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


# Plain classes, neither dataclasses nor NamedTuples: `egress run` imports neither dataclasses (with
# inspect) nor typing (docs/startup.md).


class Listener:
    """One listener created inside the sandbox: ``tcp`` or ``udp`` on 127.0.0.1:port; or ``diag``,
    a sock_diag netlink socket answering about the sandbox's own sockets (port unused)."""

    __slots__ = ("kind", "name", "port")

    def __init__(self, name: str, kind: str, port: int) -> None:
        self.name = name
        self.kind = kind
        self.port = port

    def __repr__(self) -> str:
        return f"Listener({self.name!r}, {self.kind!r}, {self.port!r})"


class SandboxSpec:
    """What to build and run: the command, its environment, the listeners to create inside."""

    __slots__ = (
        "argv",
        "close_userns",
        "cwd",
        "env",
        "foreground_tty",
        "frozen",
        "handshake_timeout",
        "hidden",
        "listeners",
        "resolv_conf",
    )

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        listeners: Sequence[Listener] = (),
        resolv_conf: str | None = RESOLV_CONF,
        cwd: str | None = None,
        handshake_timeout: float = 20.0,
        foreground_tty: int | None = None,
        hidden: Sequence[str] = (),
        frozen: Sequence[str] = (),
        close_userns: bool = False,
    ) -> None:
        self.argv = argv
        self.env = env
        self.listeners = listeners
        self.resolv_conf = resolv_conf
        self.cwd = cwd
        self.handshake_timeout = handshake_timeout
        self.foreground_tty = foreground_tty  # fd of the terminal to hand to the command, if any
        # Paths the command must not read (the gate's state directory with its CA key): each is
        # covered by an empty read-only mount inside the sandbox, or the command does not run.
        self.hidden = hidden
        # Files made read-only inside the sandbox (executables rules are bound to), or it does not
        # run.
        self.frozen = frozen
        # No user namespace can be created inside (a policy that binds rules to executables: a
        # process with capabilities in one of its own can name any file as its executable).
        self.close_userns = close_userns


def own_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def socket_netns_inode(sock: socket.socket) -> int:
    """The inode of the network namespace a socket lives in (SIOCGSKNS, Linux >= 4.9)."""
    ns_fd = fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    try:
        return os.fstat(ns_fd).st_ino
    finally:
        os.close(ns_fd)


class Sandbox:
    """The launcher's handle on one running sandbox.

    ``spawn`` returns after the handshake: the listeners exist inside the sandbox and have been
    checked to live in a network namespace other than ours, but the command has not started yet.
    Call :meth:`start` once something holds the listeners to serve them (the gate, or the gate's
    start in this process); :meth:`abort` (or any exception) instead tears the sandbox down, without
    ever running the command when it was not started.

    Call ``spawn`` from a thread that outlives the sandbox (the main thread): the helper asks the
    kernel to kill it when its parent *thread* exits, so a dead launcher leaves nothing running.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | ForkedHelper,
        ctl: socket.socket,
        sockets: dict[str, socket.socket],
        info: dict[str, Any],
    ) -> None:
        self.proc = proc
        self._ctl: socket.socket | None = ctl
        self.sockets = sockets
        self.info = info
        self.started = False
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def netns_inode(self) -> int:
        return int(self.info["netns"])

    @classmethod
    def spawn(
        cls,
        spec: SandboxSpec,
        *,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        meanwhile: Iterator[object] | None = None,
    ) -> Sandbox:
        """``meanwhile`` is work the launcher needs next anyway (loading the private gate's modules),
        in steps: they run while the helper builds the sandbox (on another core), until the sandbox
        is ready; the caller goes on with the rest."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = {
            "argv": list(spec.argv),
            "listeners": [[x.name, x.kind, x.port] for x in spec.listeners],
            "resolv_conf": spec.resolv_conf,
            "ctl": child.fileno(),
            "parent": os.getpid(),
            "tty": spec.foreground_tty,
            "netns": own_netns_inode(),
            "hide": [os.path.abspath(path) for path in spec.hidden],
            "freeze": [os.path.abspath(path) for path in spec.frozen],
            "close_userns": spec.close_userns,
        }
        try:
            proc: subprocess.Popen[bytes] | ForkedHelper
            if _can_fork(stdin, stdout, stderr):
                proc = ForkedHelper.start(config, spec, (stdin, stdout, stderr), child.fileno())
            else:
                import subprocess

                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", HELPER, json.dumps(config)],
                    env=dict(spec.env),
                    cwd=spec.cwd,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    pass_fds=(child.fileno(),),
                    close_fds=True,
                )
        except OSError as exc:
            parent.close()
            raise SandboxError(f"cannot start the sandbox helper: {exc}") from exc
        finally:
            child.close()
        try:
            if meanwhile is not None:
                _step_until_readable(parent, meanwhile)
            info, sockets = _handshake(parent, spec, proc)
        except BaseException:
            parent.close()
            _reap(proc)
            raise
        return cls(proc, parent, sockets, info)

    def start(self) -> None:
        """Let the command run. Whatever it sends waits in the listeners' queues until the gate takes
        it, so the gate may still be starting; nothing else leaves the sandbox."""
        if self._ctl is None:
            raise RuntimeError("sandbox already started or aborted")
        with contextlib.suppress(OSError):  # init has gone (killed): its status says how
            self._ctl.sendall(b"G")
        self._ctl.close()
        self._ctl = None
        self.started = True

    def abort(self) -> None:
        """Tear down, without running the command if it was not started (else it is killed).

        Closing the control socket makes init exit by itself; the helper exits only after reaping
        init, and init's exit reaps everything in its PID namespace, so once ``abort`` returns
        nothing of the sandbox is left (SIGKILL is only the fallback).
        """
        if self.started:
            self.close_sockets()
            if self.returncode is None:
                self.kill()
            return
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self.close_sockets()
        import subprocess

        try:
            self.returncode = exit_code(self.proc.wait(10))
        except subprocess.TimeoutExpired:
            self.returncode = _reap(self.proc)

    def ended(self) -> bool:
        """Whether the sandbox has exited, as far as its helper's exit says: the helper outlives
        everything inside (init's exit kills the whole PID namespace). The helper is left to be
        waited for (``WNOWAIT``), so its pid stays this sandbox's."""
        if self.returncode is not None:
            return True
        try:
            found = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already waited for elsewhere
            return True
        return found is not None

    def waiting(self) -> bool:
        """Whether a connection or datagram waits on one of the listeners for the gate to take it."""
        import select

        poller = select.poll()
        for name, sock in self.sockets.items():
            if name != "diag" and sock.fileno() >= 0:
                poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    def close_sockets(self) -> None:
        """Close the listeners (whoever served them may already have: closing twice is harmless)."""
        for sock in self.sockets.values():
            sock.close()

    def send_signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        status = self.proc.wait(timeout)
        self.returncode = exit_code(status)
        return self.returncode

    def poll(self) -> int | None:
        status = self.proc.poll()
        if status is None:
            return None
        self.returncode = exit_code(status)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the helper: its init dies with it (PDEATHSIG) and with init the whole sandbox."""
        self.send_signal(signal.SIGKILL)
        self.wait(10)


def _can_fork(*streams: int | IO[Any] | None) -> bool:
    """The helper can run in a fork of this process (no new interpreter: ~15 ms less per run) when
    this process is single-threaded, so that no lock another thread holds is copied into the child,
    and when no pipe must be made for the caller (those runs start the helper as a script)."""
    try:
        if len(os.listdir("/proc/self/task")) != 1:  # any thread, Python's or a library's
            return False
    except OSError:
        return False
    return all(s is None or (not isinstance(s, int) or s >= 0) for s in streams)


class ForkedHelper:
    """The helper (``helper.py``) run in a fork of the launcher; waited on like a ``Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(
        cls,
        config: dict[str, Any],
        spec: SandboxSpec,
        streams: tuple[int | IO[Any] | None, ...],
        keep: int,
    ) -> ForkedHelper:
        from proxy.sandbox import helper

        fds = [s if isinstance(s, int) or s is None else s.fileno() for s in streams]
        env = dict(spec.env)
        helper.preload()  # libc (ctypes) loaded here, not in the children: see helper.preload
        pid = os.fork()
        if pid == 0:  # the helper: nothing here may return into the launcher's code
            try:
                for target, fd in enumerate(fds):
                    if fd is not None and fd != target:
                        os.dup2(fd, target)
                os.closerange(3, keep)  # as close_fds=True would (close_range(2): no listing)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                if spec.cwd:
                    os.chdir(spec.cwd)
                helper.run_helper(config, env)  # env goes to the command's execve
            finally:
                os._exit(EXIT_SETUP_FAILED)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        if (code := self.poll()) is not None:
            return code
        import select

        pidfd = os.pidfd_open(self.pid)  # readable once the helper has exited: no polling
        try:
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            waiter.poll(max(0, int(timeout * 1000)))
        finally:
            os.close(pidfd)
        if (code := self.poll()) is None:
            import subprocess

            raise subprocess.TimeoutExpired(["egress-sandbox-helper"], timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def exit_code(status: int) -> int:
    """Popen's returncode (negative for a signal) as a shell reports it (128 + signal)."""
    return 128 - status if status < 0 else status


def _reap(proc: subprocess.Popen[bytes] | ForkedHelper) -> int:
    import subprocess

    if proc.poll() is None:
        proc.kill()
    try:
        return exit_code(proc.wait(10))
    except subprocess.TimeoutExpired:  # pragma: no cover - the kernel always delivers SIGKILL
        return EXIT_SETUP_FAILED


def _step_until_readable(ctl: socket.socket, steps: Iterator[object]) -> None:
    """Run ``steps`` one at a time until ``ctl`` has the helper's message (or EOF) or none is left."""
    import select

    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    while not poller.poll(0):
        if next(steps, _NO_STEP) is _NO_STEP:
            return


_NO_STEP = object()


def _handshake(
    ctl: socket.socket, spec: SandboxSpec, proc: subprocess.Popen[bytes] | ForkedHelper
) -> tuple[dict[str, Any], dict[str, socket.socket]]:
    ctl.settimeout(spec.handshake_timeout)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_MESSAGE, len(spec.listeners) + 1)
    except TimeoutError:
        raise SandboxError(
            f"the sandbox did not come up within {spec.handshake_timeout:.0f} s",
            "the machine may be overloaded; try again",
        ) from None
    received = [socket.socket(fileno=fd) for fd in fds]
    try:
        if not msg:
            status = proc.wait(10)
            raise SandboxError(
                f"the sandbox helper exited (status {exit_code(status)}) before setting up isolation",
                "run with a Python that can execute this package's files",
            )
        info: dict[str, Any] = json.loads(msg)
        if not info.get("ok"):
            raise SandboxError(str(info.get("error")), str(info.get("hint") or ""))
        if len(received) != len(spec.listeners):
            raise SandboxError(f"expected {len(spec.listeners)} listeners, got {len(received)}")
        sockets = _verify(spec, info, received)
    except BaseException:
        for sock in received:
            sock.close()
        raise
    return info, sockets


def _verify(
    spec: SandboxSpec, info: dict[str, Any], received: list[socket.socket]
) -> dict[str, socket.socket]:
    """Fail closed unless every listener is exactly what we asked for and lives in the sandbox's
    network namespace, not ours (a listener in ours would be reachable by the whole host)."""
    ours = own_netns_inode()
    theirs = int(info["netns"])
    if theirs == ours:
        raise SandboxError("the sandbox reports our own network namespace: isolation not in effect")
    sockets: dict[str, socket.socket] = {}
    for want, sock in zip(spec.listeners, received, strict=True):
        kind = socket.SOCK_STREAM if want.kind == "tcp" else socket.SOCK_DGRAM
        try:
            where = socket_netns_inode(sock)
        except OSError as exc:
            raise SandboxError(
                f"cannot check which network namespace the {want.name} listener is in: {exc}",
                "egress run needs Linux >= 4.9 (SIOCGSKNS)",
            ) from exc
        if where != theirs or where == ours:
            raise SandboxError(f"the {want.name} listener is not inside the sandbox's namespace")
        if want.kind == "diag":  # the sock_diag socket process attribution asks (not a listener)
            if sock.family != socket.AF_NETLINK:
                raise SandboxError(f"the {want.name} socket has the wrong socket type")
            sockets[want.name] = sock
            continue
        if sock.family != socket.AF_INET or sock.type != kind:
            raise SandboxError(f"the {want.name} listener has the wrong socket type")
        if sock.getsockname() != ("127.0.0.1", want.port):
            raise SandboxError(f"the {want.name} listener is bound to {sock.getsockname()}")
        if kind == socket.SOCK_STREAM and not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise SandboxError(f"the {want.name} listener is not listening")
        sockets[want.name] = sock
    return sockets
