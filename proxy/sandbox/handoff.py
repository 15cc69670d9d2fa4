"""Hand a sandbox's listeners to a gate running in another process: joined mode without a relay.

``egress run --proxy URL`` must relay every byte through the launcher, because the gate is elsewhere.
When the gate runs on the same machine it can do better: the launcher passes the listening sockets it
received from the sandbox (created inside the sandbox's network namespace) to the gate over a Unix
socket (``SCM_RIGHTS``), and the gate accepts on them itself, exactly as the private in-process gate
does. No relay, no copy, and the sandbox's identity comes from the listener, not from anything the
sandbox sends.

Who may hand off: the Unix socket is created mode 0600 (only the gate's user, and root, can connect),
and the gate checks the peer's uid (``SO_PEERCRED``) against ``allowed_uids``. A gate with per-sandbox
credentials (``--sandboxes``) additionally requires the sandbox's token, so a local user cannot claim
another sandbox's identity. Every listener is checked to be a listening socket of the expected type in
a network namespace other than the gate's own.

Lifetime: the launcher keeps its Unix connection open while the sandbox runs. When it closes (the
sandbox ended, or the launcher died), the gate closes that sandbox's listeners, which also releases
the sandbox's network namespace.

Wire format: the launcher sends one JSON object ``{"version": 1, "sandbox_id": ..., "token": ...,
"listeners": [names]}`` with the fds attached in that order; the gate answers one JSON object
``{"ok": true, "accepted": [names]}`` or ``{"ok": false, "error": ...}``. A gate that takes each
run's own policy (``egress run --reuse-gate``, :mod:`proxy.app.user_gate`) also reads a ``check``
message first, ``{"version": 1, "check": {...}}``, answered before the sandbox is built, and when the
launcher half-closes the connection at the sandbox's end it writes one closing JSON object (the run's
summary) before it closes its side.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable

from proxy.attribution.peer import peer_netns, peer_uid
from proxy.core.sandbox_id import is_sandbox_id

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import asyncio
    import logging
    from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE = 16384
REQUEST_TIMEOUT = 10.0  # for the launcher's message once it has connected
# For the gate to load a run's policy (a file on a hung mount never loads): under the launcher's
# wait for an answer (proxy.sandbox.usergate.ANSWER_TIMEOUT), so it hears why.
CHECK_TIMEOUT = 8.0
KINDS = {"proxy": socket.SOCK_STREAM, "dns-udp": socket.SOCK_DGRAM, "dns-tcp": socket.SOCK_STREAM}
# Not a listener: the sock_diag socket a gate that attributes processes asks about the sandbox's
# sockets through (created inside the sandbox's network namespace, like the listeners).
DIAG = "diag"
NETLINK_SOCK_DIAG = 4  # linux/netlink.h
# Files (not sockets) a launcher may hand over after the listeners, named in "files": a gate that
# takes one pops it from ``request["gate_files"]`` in its attach; the rest are closed.
FILES = frozenset({"decision-log"})
MAX_FDS = len(KINDS) + 1 + len(FILES)

# A detach may return the closing message for the launcher (None: nothing to say).
Detach = Callable[[], Awaitable["dict[str, Any] | None"]]
# (proven sandbox id, listeners by name, the launcher's whole request) -> detach
Attach = Callable[[str, dict[str, socket.socket], "dict[str, Any]"], Awaitable[Detach]]
Authenticate = Callable[[str, str | None], str | None]  # (claimed id, token) -> proven id or None
Check = Callable[["dict[str, Any]"], "dict[str, Any]"]  # a check message's body -> the answer


class HandoffError(Exception):
    """The gate refused the hand-off (or could not be reached); the message says why."""


# -- launcher side ------------------------------------------------------------------------------


def hand_off(
    path: str,
    sandbox_id: str,
    sockets: dict[str, socket.socket],
    *,
    token: str | None = None,
    timeout: float = 10.0,
) -> tuple[socket.socket, list[str]]:
    """Give the listeners to the gate at ``path``; returns the connection to keep open for the
    sandbox's lifetime, and the listener names the gate took."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
        names = list(sockets)
        message = {
            "version": PROTOCOL_VERSION,
            "sandbox_id": sandbox_id,
            "token": token,
            "listeners": names,
        }
        reply = send_message(conn, message, [sockets[n].fileno() for n in names])
        if not reply.get("ok"):
            raise HandoffError(str(reply.get("error") or "refused"))
        conn.settimeout(None)
        return conn, [str(n) for n in reply.get("accepted", [])]
    except (OSError, ValueError) as exc:
        conn.close()
        raise HandoffError(f"cannot hand the sandbox to the gate at {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise


def send_message(conn: socket.socket, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Send one launcher message (with ``fds`` attached) and read the gate's one answer: OSError
    when the gate closed without answering, ValueError when the answer is not a JSON object."""
    socket.send_fds(conn, [json.dumps(message).encode()], fds)
    raw = conn.recv(MAX_MESSAGE)
    if not raw:
        raise ConnectionResetError("the gate closed the connection without answering")
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise ValueError("the gate's answer is not a JSON object")
    return reply


# -- gate side ----------------------------------------------------------------------------------


def _log() -> logging.Logger:
    import logging  # the gate's side only: the launcher hands off without loading logging

    return logging.getLogger(__name__)


def check_listener(sock: socket.socket, name: str, own_netns: int) -> None:
    """Raise HandoffError unless ``sock`` is a loopback listener of the right kind (or the sandbox's
    sock_diag socket) that lives in a network namespace other than ours (a sandbox's)."""
    if name == DIAG:
        if sock.family != socket.AF_NETLINK or sock.proto != NETLINK_SOCK_DIAG:
            raise HandoffError("the diag socket is not a sock_diag netlink socket")
        _check_netns(sock, name, own_netns)
        return
    kind = KINDS.get(name)
    if kind is None:
        raise HandoffError(f"unknown listener {name!r}")
    if sock.family != socket.AF_INET or sock.type != kind:
        raise HandoffError(f"the {name} listener has the wrong socket type")
    if sock.getsockname()[0] != "127.0.0.1":
        raise HandoffError(f"the {name} listener is not bound to 127.0.0.1")
    if kind == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise HandoffError(f"the {name} listener is not listening")
    _check_netns(sock, name, own_netns)


def _check_netns(sock: socket.socket, name: str, own_netns: int) -> None:
    from proxy.sandbox.namespace import socket_netns_inode

    try:
        where = socket_netns_inode(sock)
    except OSError as exc:
        raise HandoffError(f"cannot check the {name} listener's network namespace: {exc}") from exc
    if where == own_netns:
        raise HandoffError(f"the {name} listener is in the gate's own network namespace")


class HandoffServer:
    """Accepts sandbox listeners on a Unix socket and serves them through ``attach``."""

    def __init__(
        self,
        path: str,
        attach: Attach,
        *,
        allowed_uids: Iterable[int] | None = None,
        authenticate: Authenticate | None = None,
        check: Check | None = None,
        launchers_beside: bool = False,
        mode: int = 0o600,
        max_sandboxes: int = 256,
    ) -> None:
        self.path = path
        self.attach = attach
        self.check = check  # answers a launcher's check message (None: such a message is refused)
        # Only a process in the gate's own network namespace may hand over: a launcher always is,
        # a sandboxed process never (a gate whose socket any process of its user can reach).
        self.launchers_beside = launchers_beside
        self.allowed_uids = set(allowed_uids) if allowed_uids is not None else {os.geteuid(), 0}
        self.authenticate = authenticate
        self.mode = mode
        self.max_sandboxes = max_sandboxes
        self.attached: dict[str, int] = {}  # sandbox id -> live hand-offs (for tests and metrics)
        self.serving = 0  # launcher connections open now (checking, handing off or attached)
        self._sock: socket.socket | None = None
        self._owns_path = True  # the name is ours to remove when we close
        self._tasks: set[asyncio.Task[None]] = set()
        self._own_netns = os.stat("/proc/self/ns/net").st_ino

    async def start(self, listening: socket.socket | None = None) -> None:
        """Listen at ``path``; or accept on ``listening``, a socket already bound there by whoever
        started this gate (systemd's socket activation), which keeps the name."""
        if listening is not None:
            self._owns_path = False
            sock = listening
        else:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)  # a stale socket from a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # no window in which the socket is connectable by others
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, self.mode)
            sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept_loop(sock))

    def _spawn(self, coro: Any) -> None:
        import asyncio  # the gate's side only: `egress run` hands off without loading asyncio

        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError:
                return
            if sum(self.attached.values()) >= self.max_sandboxes:
                self._reply(conn, {"ok": False, "error": "too many sandboxes on this gate"})
                conn.close()
                continue
            self._spawn(self._serve(conn))

    @staticmethod
    def _reply(conn: socket.socket, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.setblocking(True)
            conn.settimeout(5)
            conn.sendall(json.dumps(obj).encode())

    async def _serve(self, conn: socket.socket) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        received: list[int] = []  # descriptors not yet owned by a socket object or the attach
        sockets: dict[str, socket.socket] = {}
        files: dict[str, int] = {}
        detach: Detach | None = None
        sandbox_id = "?"
        self.serving += 1
        try:
            try:
                request, received = await self._request(conn)
                if "check" in request:  # answered, then the hand-off itself follows
                    _close_fds(received)
                    received = []
                    body = request["check"]
                    if self.check is None or not isinstance(body, dict):
                        raise HandoffError("this gate takes no check message")
                    # in a thread: loading a policy must not stall the sandboxes already served
                    from proxy.runtime.threads import in_daemon_thread

                    try:
                        answer = await in_daemon_thread(self.check, body, timeout=CHECK_TIMEOUT)
                    except TimeoutError:
                        raise HandoffError(
                            f"the policy did not load within {CHECK_TIMEOUT:g} s"
                        ) from None
                    self._reply(conn, answer)
                    request, received = await self._request(conn)
                    if not request:
                        return  # the launcher went another way (its own gate) after the check
                    if "check" in request:
                        raise HandoffError("one check message per connection")
                names = request.get("listeners")
                file_names = request.get("files", [])
                if (
                    not isinstance(names, list)
                    or not isinstance(file_names, list)
                    or len(names) + len(file_names) != len(received)
                    or "proxy" not in names
                    or len(set(names)) != len(names)
                    or len(set(file_names)) != len(file_names)
                    or not set(file_names) <= FILES
                ):
                    raise HandoffError("the listeners do not match their names")
                sandbox_id = self._identify(request)
                for name in names:
                    sockets[name] = socket.socket(fileno=received[0])  # OSError: not a socket
                    received.pop(0)
                files.update(zip(file_names, received, strict=True))
                received = []
                for name, sock in sockets.items():
                    check_listener(sock, name, self._own_netns)
                request["gate_warnings"] = []  # the attach's to fill, whatever the message said
                request["gate_files"] = files  # the attach pops what it keeps
                detach = await self.attach(sandbox_id, sockets, request)
            except (HandoffError, ValueError, OSError) as exc:
                _log().warning("refused a sandbox hand-off (%s): %s", sandbox_id, exc)
                self._reply(conn, {"ok": False, "error": str(exc)})
                for sock in sockets.values():
                    sock.close()
                return
            finally:
                _close_fds([*received, *files.values()])  # whatever nobody took
                files.clear()
            self.attached[sandbox_id] = self.attached.get(sandbox_id, 0) + 1
            reply: dict[str, Any] = {"ok": True, "accepted": list(sockets)}
            if request["gate_warnings"]:
                reply["warnings"] = request["gate_warnings"]
            self._reply(conn, reply)
            _log().info("sandbox %s handed over %s", sandbox_id, ", ".join(sockets))
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                # Anything but EOF is ignored; a turn for the gate's other clients after each
                # read, since asyncio's sock_recv does not wait while bytes keep coming.
                while await loop.sock_recv(conn, 4096):
                    await asyncio.sleep(0)
        finally:
            if detach is not None:
                closing = None
                try:
                    closing = await detach()
                except Exception:
                    _log().exception("sandbox %s: detaching failed", sandbox_id)
                if closing is not None:
                    await _say(conn, closing)
                self.attached[sandbox_id] -= 1
                if not self.attached[sandbox_id]:
                    del self.attached[sandbox_id]
                _log().info("sandbox %s ended; its listeners are closed", sandbox_id)
            conn.close()
            self.serving -= 1

    async def _request(self, conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        """The launcher's next message (checked: its sender's uid, its version) and the descriptors
        it carried, which the caller owns (closed by it on a refusal); an empty message at the
        connection's end."""
        msg, received = await _receive_request(conn)
        if not msg and not received:
            return {}, []  # the launcher closed the connection
        try:
            uid = peer_uid(conn)  # read first, so the refusal reaches the launcher
            if uid not in self.allowed_uids:
                raise HandoffError(f"uid {uid} may not hand sandboxes to this gate")
            if self.launchers_beside:
                try:
                    beside = peer_netns(conn) == self._own_netns
                except OSError as exc:
                    raise HandoffError(f"cannot tell where the launcher runs: {exc}") from None
                if not beside:
                    raise HandoffError(
                        "a process in another network namespace (a sandbox's) "
                        "may not hand sandboxes to this gate"
                    )
            request = json.loads(msg)
            if not isinstance(request, dict):
                raise HandoffError("the request is not a JSON object")
            if request.get("version") != PROTOCOL_VERSION:
                raise HandoffError(f"unsupported hand-off version {request.get('version')!r}")
            request["peer_uid"] = uid  # the kernel's word, whatever the message said
        except BaseException:
            _close_fds(received)
            raise
        return request, received

    def _identify(self, request: dict[str, Any]) -> str:
        claimed = request.get("sandbox_id")
        if not isinstance(claimed, str) or not is_sandbox_id(claimed):
            raise HandoffError("invalid sandbox id")
        if self.authenticate is None:
            return claimed
        token = request.get("token")
        proven = self.authenticate(claimed, token if isinstance(token, str) else None)
        if proven is None:
            raise HandoffError(f"sandbox {claimed}: missing or wrong credential")
        return proven

    async def close(self) -> None:
        if self._sock is not None:
            # The name first: a successor bound to the same path must not lose its socket to us.
            if self._owns_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self._sock.close()
            self._sock = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            import asyncio

            await asyncio.wait(tasks, timeout=5)


async def _receive_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The launcher's one message and its descriptors, read on the loop (no thread): it has usually
    arrived with the connection; otherwise wait until it does, at most REQUEST_TIMEOUT seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    deadline = loop.time() + REQUEST_TIMEOUT
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
            return msg, fds
        except (BlockingIOError, InterruptedError):
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _resolve, readable)
        try:
            async with asyncio.timeout_at(deadline):
                await readable
        except TimeoutError:
            raise HandoffError(f"no request within {REQUEST_TIMEOUT:g} s") from None
        finally:
            loop.remove_reader(conn.fileno())


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _say(conn: socket.socket, message: dict[str, Any]) -> None:
    """The closing message, on the loop and bounded: a launcher that stopped reading cannot hold
    the gate."""
    import asyncio

    with contextlib.suppress(OSError, TimeoutError):
        conn.setblocking(False)
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_sendall(conn, json.dumps(message).encode())


def _resolve(future: Any) -> None:
    if not future.done():
        future.set_result(None)


def gate_attacher(gate: Any, dns_gate_for: Callable[[str], Any] | None = None) -> Attach:
    """``attach`` for a running :class:`addons.master.Gate` (and a DnsGate factory, per sandbox)."""

    async def attach(
        sandbox_id: str, sockets: dict[str, socket.socket], _request: dict[str, Any] | None = None
    ) -> Detach:
        if DIAG in sockets:  # this gate attributes nothing
            sockets.pop(DIAG).close()
        server = await gate.add_listener(sockets["proxy"], sandbox_id=sandbox_id)
        dns = None
        try:
            if dns_gate_for is not None and "dns-udp" in sockets and "dns-tcp" in sockets:
                dns = dns_gate_for(sandbox_id)
                await dns.serve_udp(sock=sockets["dns-udp"])
                await dns.serve_tcp(sock=sockets["dns-tcp"])
            else:
                for name in ("dns-udp", "dns-tcp"):
                    if name in sockets:
                        sockets[name].close()
        except BaseException:
            gate.remove_listener(server)
            raise

        async def detach() -> None:
            gate.remove_listener(server)
            if dns is not None:
                dns.close()
                await dns.wait_closed()
            return None

        return detach

    return attach


def identities_authenticator(identities: Any) -> Authenticate:
    """Check a hand-off's token the same way the gate checks a proxy credential."""
    import base64

    def authenticate(claimed: str, token: str | None) -> str | None:
        if token is None:
            return None
        header = "Basic " + base64.b64encode(f"{claimed}:{token}".encode()).decode()
        sandbox = identities.authenticate(header)
        return str(sandbox.id) if sandbox is not None and sandbox.id == claimed else None

    return authenticate
