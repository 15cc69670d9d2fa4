"""The per-user gate, launcher side: ``egress run --reuse-gate`` hands its sandbox to one gate per user.

A private gate costs every ``egress run`` its start (~250-300 ms of imports and policy loading on a
2-core machine); a harness that wraps each tool call in ``egress run`` pays it each time. With
``--reuse-gate`` (or ``EGRESS_REUSE_GATE=1``) the first run starts a gate for this user
(:mod:`proxy.app.user_gate`), and every run hands its sandbox's listeners to it over a Unix socket
(:mod:`proxy.sandbox.handoff`): each later run costs the hand-off path. The gate exits after an idle
period with no sandbox attached.

Each run keeps its own policy: the launcher names its policy file (and managed ceiling) in a check
message before the sandbox is built, and the gate loads it, answers whether it reads requests (the
sandbox must then trust the gate's CA) and serves that sandbox's listeners with it alone, seeing the
sandbox's processes through its own sock_diag socket as a private gate does. A run the shared gate
cannot serve exactly as a private gate would (ask rules; options that name the run's own evidence,
secrets, CA or resolver) gets a private gate, as without the flag.

Who may use the gate: its directory is ``$XDG_RUNTIME_DIR/agent-egress`` (else
``/tmp/agent-egress-UID``), created 0700 and refused unless it is a directory this user owns that
nobody else can enter; the socket is 0600 and the gate checks the peer's uid (``SO_PEERCRED``).
The launcher checks the gate's uid too, so a socket another user planted is never handed a sandbox.
The directory is hidden inside every sandbox (a tmpfs over it), whichever gate serves it: a
sandboxed process, which runs as the same user, cannot reach the socket to hand over listeners of
its own with a wider policy. Hiding is by path (a gate started with another ``XDG_RUNTIME_DIR``
lives elsewhere), so the gate also refuses every peer outside its own network namespace.

The gate is started with ``python -P`` in ``/``: nothing in the directory the first run worked in
(a repository the agent writes to) can shadow a module the gate imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from proxy.attribution.peer import peer_netns, peer_uid
from proxy.sandbox.gatedir import UserGateError, gate_dir, private_dir
from proxy.sandbox.handoff import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    HandoffError,
    send_message,
)

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from proxy.sandbox.trust import Trust

ENV_VAR = "EGRESS_REUSE_GATE"
PRESETS_ENV = "EGRESS_PRESETS_DIR"  # proxy.policy.presets.ENV_VAR, without importing it here
# The installation a launcher and a gate run: a gate from another one (an upgrade since it started)
# is not handed sandboxes.
CODE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the `proxy` package
SOCKET_NAME = "gate.sock"
LOCK_NAME = "start.lock"
LOG_NAME = "gate.log"
PID_NAME = "gate.pid"
IDLE_EXIT = 300.0  # seconds with no sandbox attached before the gate exits
START_TIMEOUT = 30.0  # for a new gate to say it is ready
ANSWER_TIMEOUT = 10.0  # for the gate's answer to a check or a hand-off
CLOSING_TIMEOUT = 5.0  # for the run's summary once the sandbox has ended


def wanted(flag: bool, environ: Mapping[str, str] | None = None) -> bool:
    """``--reuse-gate``, or ``EGRESS_REUSE_GATE=1`` for a harness that cannot change the command."""
    env = os.environ if environ is None else environ
    return flag or env.get(ENV_VAR, "") in ("1", "yes", "true")


def own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def open_private(path: str, flags: int) -> int:
    """A file in the gate's directory, never through a symlink planted there (the directory is this
    user's, but a sandbox of this user may have made it)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)


# What in the environment shapes how a gate serves: where bare include names resolve, what it
# trusts upstream (read by OpenSSL), its event loop. A run whose values differ from the running
# gate's gets a gate of its own; paths are compared absolute (the gate works in /).
SHAPING = (PRESETS_ENV, "SSL_CERT_FILE", "SSL_CERT_DIR", "EGRESS_EVENT_LOOP")
_PATHS = frozenset({PRESETS_ENV, "SSL_CERT_FILE", "SSL_CERT_DIR"})


def shaping(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {
        name: os.path.abspath(env[name]) if name in _PATHS else env[name]
        for name in SHAPING
        if env.get(name)
    }


class Session:
    """One run's connection to the per-user gate: the check's answer, then the hand-off, then the
    run's summary when the sandbox ends."""

    def __init__(
        self, conn: socket.socket, directory: str, check: dict[str, Any], answer: dict[str, Any]
    ) -> None:
        self.conn = conn
        self.directory = directory
        self.path = os.path.join(directory, SOCKET_NAME)
        self.check = check  # what the run asked for: its policy files
        self.answer = answer

    @property
    def frozen(self) -> tuple[str, ...]:
        """The files the run's policy binds rules to: read-only inside the sandbox."""
        paths = self.answer.get("frozen")
        return tuple(str(p) for p in paths) if isinstance(paths, list) else ()

    @property
    def binds(self) -> bool:
        """Whether the run's policy binds rules to executables: the sandbox is then built so that
        no user namespace can be created inside (see ``helper._close_user_namespaces``)."""
        return self.answer.get("binds") is True

    def trust(self) -> Trust:
        """What the sandbox trusts and cannot read: the gate's state directory (its CA key) and this
        directory (the socket) hidden always; when the run's policy reads requests, a bundle of the
        system's CAs and the gate's, written for this run."""
        from proxy.sandbox.trust import Trust, bundle_trust, untrusted

        hidden = [self.directory]
        state = self.answer.get("state")
        if isinstance(state, str) and os.path.isabs(state):
            hidden.append(state)
        parts = self.answer.get("trust") if self.answer.get("inspects") else None
        if not isinstance(parts, list) or not parts:
            return Trust(bundle=None, hidden=tuple(hidden))
        try:
            return bundle_trust([str(part) for part in parts], hidden)
        except (OSError, ValueError) as exc:
            raise untrusted(exc) from exc

    def hand_off(
        self,
        sandbox_id: str,
        sockets: dict[str, socket.socket],
        summary: str | None,
        *,
        sandbox_pid: int | None = None,
        context: dict[str, str] | None = None,
        traceparent: str | None = None,
        files: dict[str, int] | None = None,
    ) -> list[str]:
        """Give the listeners (and the sandbox's sock_diag socket) to the gate; the warnings it
        had. ``summary``: "text", "json" or None (none wanted), the closing message's format;
        ``sandbox_pid``: the sandbox helper's pid, under which the gate finds its processes;
        ``context`` and ``traceparent``: what every decision of the run carries; ``files``: open
        files the gate writes for this run (its decision log)."""
        names = list(sockets)
        files = files or {}
        message = {
            "version": PROTOCOL_VERSION,
            "sandbox_id": sandbox_id,
            "listeners": names,
            "files": list(files),
            "policy": self.check,
            "summary": summary,
            "frozen": list(self.frozen),  # what the sandbox was built to keep read-only
            "userns_closed": self.binds,  # ... and whether it can create user namespaces
            "sandbox_pid": sandbox_pid,
            "context": context or {},
            "traceparent": traceparent,
        }
        try:
            reply = send_message(
                self.conn, message, [*(sockets[n].fileno() for n in names), *files.values()]
            )
        except (OSError, ValueError) as exc:
            raise HandoffError(
                f"cannot hand the sandbox to the gate at {self.path}: {exc}"
            ) from exc
        if not reply.get("ok"):
            raise HandoffError(str(reply.get("error") or "refused"))
        self.conn.settimeout(None)
        warnings = reply.get("warnings")
        return [str(w) for w in warnings] if isinstance(warnings, list) else []

    def finish(self) -> str:
        """The sandbox has ended: say so (half-close) and read the run's summary ("" if the gate
        sent none in time)."""
        out = b""
        try:
            self.conn.shutdown(socket.SHUT_WR)
            self.conn.settimeout(CLOSING_TIMEOUT)
            while len(out) <= MAX_MESSAGE * 16:
                more = self.conn.recv(MAX_MESSAGE)
                if not more:
                    break
                out += more
            closing = json.loads(out) if out else {}
        except (OSError, ValueError):
            return ""
        finally:
            self.close()
        text = closing.get("summary") if isinstance(closing, dict) else None
        return text if isinstance(text, str) else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()


def policy_check(policy: str | None, managed: str | None) -> dict[str, Any]:
    """The check message's body: the run's policy files, absolute (the gate has its own working
    directory), and the installation asking."""
    return {
        "path": os.path.abspath(policy) if policy is not None else None,
        "managed": os.path.abspath(managed) if managed is not None else None,
        "code": CODE,
        "env": shaping(),  # what this run's own gate would be started with
    }


def open_session(check: dict[str, Any], environ: Mapping[str, str] | None = None) -> Session:
    """Connect to this user's gate (starting it when none runs) and ask it about this run's policy
    (``check``: :func:`policy_check`). UserGateError when no gate can be used."""
    directory = private_dir(gate_dir(environ))
    path = os.path.join(directory, SOCKET_NAME)
    problem = "no answer"
    for _attempt in range(2):  # a gate that was exiting as it idled out gets one successor
        conn = _connect(path)
        if conn is None:
            conn = _start_and_connect(directory, path)
        try:
            owner = peer_uid(conn)
            if owner != os.geteuid():
                raise UserGateError(f"the gate at {path} runs as uid {owner}, not {os.geteuid()}")
            try:
                beside = peer_netns(conn) == own_netns()
            except OSError as exc:
                raise UserGateError(f"cannot tell where the gate at {path} runs: {exc}") from None
            if not beside:  # a process in a sandbox planted it: never hand it a sandbox
                raise UserGateError(f"the gate at {path} runs in another network namespace")
            conn.settimeout(ANSWER_TIMEOUT)
            answer = send_message(conn, {"version": PROTOCOL_VERSION, "check": check}, [])
            return Session(conn, directory, check, answer)
        except UserGateError:
            conn.close()
            raise
        except (OSError, ValueError) as exc:
            conn.close()
            problem = str(exc) or type(exc).__name__
    raise UserGateError(f"the gate at {path} did not answer: {problem}")


def _connect(path: str) -> socket.socket | None:
    """A connection to a running gate, or None when none listens there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(ANSWER_TIMEOUT)
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    except OSError as exc:
        conn.close()
        raise UserGateError(f"cannot reach the gate at {path}: {exc}") from None
    return conn


def _start_and_connect(directory: str, path: str) -> socket.socket:
    """Start the gate, unless another launcher did while this one waited for the lock."""
    import fcntl

    try:
        lock = open_private(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise UserGateError(f"cannot lock {directory}: {exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is None:
            start(directory)
            conn = _connect(path)
        if conn is None:
            raise UserGateError(f"the gate started but does not listen at {path}")
        return conn
    finally:
        os.close(lock)  # and the lock with it


def start(directory: str, idle: float = IDLE_EXIT, environ: Mapping[str, str] | None = None) -> int:
    """Start a gate serving ``directory`` in its own session (it outlives this run); its pid, once
    it said it is ready. Its log goes to ``directory/gate.log``; ``environ``: its environment (this
    process's by default)."""
    import select
    import subprocess
    import sys

    env = dict(os.environ if environ is None else environ)
    env.update(shaping(env))  # the gate works in /: a relative path means the launcher's
    if env.get("EGRESS_STATE_DIR"):
        env["EGRESS_STATE_DIR"] = os.path.abspath(env["EGRESS_STATE_DIR"])
    ready, signal_ready = os.pipe()
    try:
        log = open_private(
            os.path.join(directory, LOG_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )
    except OSError as exc:
        raise UserGateError(f"cannot write the gate's log in {directory}: {exc}") from None
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # no working directory on sys.path: see the module's docstring
                "-E",  # nor PYTHONPATH or other PYTHON* settings of the first run
                "-m",
                "proxy.app.user_gate",
                "--dir",
                directory,
                "--ready-fd",
                str(signal_ready),
                "--idle-exit",
                f"{idle:g}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(signal_ready,),
            start_new_session=True,
            cwd="/",
            env=env,
        )
        os.close(signal_ready)
        signal_ready = -1
        waiter = select.poll()
        waiter.register(ready, select.POLLIN)
        said = os.read(ready, 1) if waiter.poll(START_TIMEOUT * 1000) else b""
    finally:
        os.close(ready)
        if signal_ready >= 0:
            os.close(signal_ready)
        os.close(log)
    if said != b"R":
        with contextlib.suppress(OSError):
            proc.kill()
        raise UserGateError(
            f"the per-user gate did not start; its log is {os.path.join(directory, LOG_NAME)}"
        )
    return proc.pid
