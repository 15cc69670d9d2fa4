"""Real parts for integration tests: counting upstreams, a test CA, and a real gate on loopback.

The counting upstream is the proof a denial leaked nothing: it counts every accepted TCP connection and
every byte, so a test asserts ``accepted == 0`` after a refusal instead of trusting the refusal message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import random
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from proxy.core.decision import Decision
from proxy.evidence.emit import Emitter, MemorySink, Sink

WAIT = 10.0  # upper bound for any single wait in the harness


# -- certificates ------------------------------------------------------------------------------


@dataclass
class LocalCA:
    """A throwaway CA and one leaf certificate for the names tests use; clients trust ``ca_path``."""

    directory: Path
    names: Sequence[str]
    ca_path: Path = field(init=False)
    cert_path: Path = field(init=False)
    key_path: Path = field(init=False)

    def __post_init__(self) -> None:
        from proxy.app.demogit import throwaway_ca

        self.ca_path, self.cert_path, self.key_path = throwaway_ca(self.directory, self.names)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


# -- counting upstream -------------------------------------------------------------------------


def _listening(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class LoopbackServer:
    """A TCP listener on loopback whose accept loop runs in a thread, for tests and benchmarks.

    It counts accepted connections and gives each to :meth:`handle` (in a thread of its own when
    ``threaded``), closing it afterwards; a subclass says what serving means. It binds ``host:port``
    (``port=0``: one :func:`on_a_namespace_port` picks, so a sandbox's connects never take it as
    their own; a fixed port may raise PermissionError or EADDRINUSE), or serves a
    listening socket it is given, such as one made inside a sandbox, which then stays open on
    :meth:`stop` for its owner to close. :meth:`stop` closes the connections still being served."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        threaded: bool = False,
        backlog: int = 16,
        name: str = "loopback-server",
    ) -> None:
        self._owns_sock = sock is None
        if sock is None:
            if port:
                sock = _listening(host, port, backlog)
            else:
                sock = on_a_namespace_port(lambda chosen: _listening(host, chosen, backlog))
        sock.settimeout(0.1)  # how often the accept loop looks at the stop flag
        self.sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.threaded = threaded
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._thread.start()

    def handle(self, conn: socket.socket) -> None:
        """Serve one accepted connection; it is closed when this returns. Default: nothing."""

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            if self.threaded:
                threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()
            else:
                self._serve_one(conn)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()
            with self._lock:
                self._conns.remove(conn)

    def stop(self) -> None:
        self._stop.set()
        if self._owns_sock:
            self.sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
        self._thread.join(WAIT)


class Canary(LoopbackServer):
    """A TCP listener that only counts accepted connections (and closes them): any connection here
    is a leak. ``port=0`` picks a port as :class:`LoopbackServer` does."""


class Upstream(LoopbackServer):
    """A loopback HTTP/1.1 server (optionally TLS) that counts accepted connections and bytes.

    It answers every request with 200 and a body naming itself and the Host header it saw, keeping the
    connection alive, so tests can see which upstream a request reached and how many connections it took.
    """

    def __init__(
        self,
        name: str = "upstream",
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        body_size: int = 0,
        port: int = 0,
    ) -> None:
        self.name = name
        self.tls = tls
        self.body_size = body_size
        self.bytes_received = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, target, headers)
        self.heads: list[bytes] = []  # raw request heads, exactly as received
        super().__init__(host, port, threaded=True, backlog=128, name=f"upstream-{name}")

    def handle(self, raw: socket.socket) -> None:
        raw.settimeout(WAIT)
        conn = raw if self.tls is None else self.tls.wrap_socket(raw, server_side=True)
        with conn:
            buf: bytes | None = b""
            for _ in range(10_000):  # bounded number of requests per connection
                while buf is not None and b"\r\n\r\n" not in buf:
                    buf = self._more(conn, buf)
                if buf is None:
                    return
                head, buf = buf.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.heads.append(head)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" "), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                while buf is not None and len(buf) < length:
                    buf = self._more(conn, buf)
                if buf is None:
                    return
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append((method, target, headers))
                conn.sendall(self.answer(method, target, headers, body))

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        """The response to one request (subclasses may answer otherwise)."""
        text = f"hello from {self.name}: {method} {target} host={headers.get('host', '')}\n"
        payload = text.encode() + b"x" * self.body_size
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )

    def _more(self, conn: socket.socket, buf: bytes) -> bytes | None:
        """``buf`` and what arrives next, counted; None once the client has closed."""
        chunk = conn.recv(65536)
        if not chunk:
            return None
        with self._lock:
            self.bytes_received += len(chunk)
        return buf + chunk

    def reset(self) -> None:
        with self._lock:
            self.accepted = 0
            self.bytes_received = 0
            self.requests.clear()
            self.heads.clear()


class Stoppable(Protocol):
    def stop(self) -> None: ...


def serving[S: Stoppable](server: S) -> Iterator[S]:
    """The body of a fixture that serves ``server`` and stops it at teardown:
    ``yield from serving(Upstream("plain"))``."""
    try:
        yield server
    finally:
        server.stop()


def terminate(proc: subprocess.Popen[Any], grace: float = 15.0) -> int:
    """Stop ``proc`` as a supervisor would: SIGTERM, ``grace`` seconds to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Whether ``predicate`` held within ``timeout`` seconds: for what a server thread or the gate
    records after the client's side of an exchange is over (a count, a relayed byte)."""
    return bool(_polled(predicate, timeout))


def waited_for[T](
    check: Callable[[], T], what: str, timeout: float = WAIT, interval: float = 0.02
) -> T:
    """What ``check`` returned once it was truthy (a record, a line), within ``timeout`` seconds;
    AssertionError naming ``what`` when it never was. ``interval``: longer for a check that
    starts a process."""
    found = _polled(check, timeout, interval)
    if not found:
        raise AssertionError(f"{what}: not there after {timeout:g} s")
    return found


def _polled[T](check: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """``check()`` every ``interval`` seconds until it is truthy or ``timeout`` seconds have
    passed; its last value (a last look at the deadline: a slow check is not cut short)."""
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(interval)
    return found


def free_port() -> int:
    """A loopback TCP port nothing holds now, for what must be told its port before it binds it (a
    port written into a policy, a server with no port-0 option). Another bind may take it before
    that: start it through :func:`on_a_free_port`, which picks again when that happened."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_port_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_below(top: int, kind: int, span: int = 10_000) -> int:
    """A port in [top - span, top) (at least 1024) that binds now on loopback, picked at random."""
    floor = max(1024, top - span)
    for _ in range(100):
        port = random.randrange(floor, top)
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port between {floor} and {top}")


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on, for a test that needs a refusal (or an unreachable
    nameserver) there. Picked below the kernel's ephemeral range, which every bind to port 0 and
    every connect takes its ports from, so the suite's other process cannot take it meanwhile; a
    port a service on the host holds is skipped."""
    return _free_below(_local_port_floor(), kind)


def restartable_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free port for a server that a test stops and starts again on the same port (a collector or
    a nameserver taken away and brought back): below :func:`closed_port`'s range, so no test takes
    it for a closed port, and below the kernel's local ports, so no connect (whose TIME_WAIT holds
    its port for a minute) or port-0 bind takes it while the server is down. (Another server
    picking a restartable port then may still take it: one pick in 10,000.)"""
    top = _local_port_floor() - 10_000
    if top < 1024 + 10_000:
        raise AssertionError(f"the local port range starts too low ({top + 10_000}) to keep ports")
    return _free_below(top, kind)


NAMESPACE_PORTS = (32768, 60999)  # a new network namespace's local ports (the kernel's default)


def on_a_namespace_port[T](start: Callable[[int], T]) -> T:
    """What ``start(port)`` returned, on a host port that no connect in a new network namespace (a
    sandbox) takes as its local port. In the sandbox the host's port is free: a connect there
    whose kernel-picked local port equals it reaches itself (TCP's simultaneous open, UDP's echo)
    and reads as if it got through. Ports above the default range; one taken is skipped."""
    return on_a_free_port(start, 100, pick=_above_namespace_ports)[1]


def _above_namespace_ports() -> int:
    return random.randrange(NAMESPACE_PORTS[1] + 1, 65536)


def on_a_free_port[T](
    start: Callable[[int], T], attempts: int = 5, *, pick: Callable[[], int] = free_port
) -> tuple[int, T]:
    """The port and what ``start(port)`` returned, on a port just picked (``pick``: a kernel-chosen
    one by default); on a new one when the start failed because another bind took the port in
    between (the suite runs in two processes, each binding port 0 often): EADDRINUSE raised, or
    "address already in use" in what the failure (or its cause) says, as a gate's log does. Any
    other failure, or the last attempt's, is raised as it is."""
    for attempt in range(1, attempts + 1):
        port = pick()
        try:
            return port, start(port)
        except Exception as exc:
            if not _port_taken(exc) or attempt == attempts:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _port_taken(exc: BaseException | None) -> bool:
    """Whether a failure, or one it was raised from, says its port was taken."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        if "address already in use" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def recv_head(conn: socket.socket, limit: int = 65536) -> bytes:
    """Bytes up to and including the blank line ending an HTTP head (less if the peer closes first,
    at most about ``limit``); anything after it that arrived in the same read is included too."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def answered_during_a_flood(
    gate: RunningGate, flood: bytes, count: int, probe: bytes, probe_host: str
) -> int:
    """How many of one connection's ``count`` pipelined ``flood`` requests the gate had recorded
    when it recorded a second connection's ``probe`` (sent once the flood's first answer is in).
    The gate never waits while the kernel holds a connection's bytes: a loop that also never
    yielded would decide the whole flood first (``count``). Each request must be one the gate
    answers without an upstream, and ``probe``'s the only one to ``probe_host``."""
    flooding = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    answers = [0]
    first = threading.Event()

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := flooding.recv(1 << 20):
                answers[0] += chunk.count(b"HTTP/1.1 ")
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    writer = threading.Thread(target=flooding.sendall, args=(flood * count,), daemon=True)
    writer.start()
    try:
        assert first.wait(WAIT), "the flood was not answered"
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as second:
            second.sendall(probe)
            assert recv_head(second).startswith(b"HTTP/1.1 4")
        records = list(gate.memory.decisions)
        at = next(i for i, d in enumerate(records) if d.host == probe_host)
        assert wait_until(lambda: answers[0] >= count), "the flood was not answered in full"
        return at
    finally:
        with contextlib.suppress(OSError):
            flooding.shutdown(socket.SHUT_RDWR)  # ends the reader's recv (a close would not)
        writer.join(WAIT)
        reader.join(WAIT)
        flooding.close()


def client_hello(server_hostname: str | None, extra_extension: bytes = b"") -> bytes:
    """A real ClientHello from Python's ssl, optionally with one more extension appended."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    record = outgoing.read()
    if not extra_extension:
        return record
    # record(5) | handshake type(1) len(3) | version(2) random(32) | sid | suites | compression | exts
    body = bytearray(record[9:])
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + struct.unpack("!H", body[pos : pos + 2])[0]
    pos += 1 + body[pos]
    ext_len = struct.unpack("!H", body[pos : pos + 2])[0]
    body[pos : pos + 2] = struct.pack("!H", ext_len + len(extra_extension))
    body += extra_extension
    handshake = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return record[:3] + struct.pack("!H", len(handshake)) + handshake


def server_hello(*, retry: bool = False) -> bytes:
    """A TLS 1.3 ServerHello record (TLS_AES_128_GCM_SHA256, x25519); with ``retry``, a
    HelloRetryRequest (RFC 8446 4.1.3: the same message with its fixed random)."""
    from proxy.core.helloretry import RETRY_RANDOM

    random = RETRY_RANDOM if retry else bytes(range(32))
    versions = b"\x00\x2b\x00\x02\x03\x04"
    key_share = b"\x00\x33\x00\x02\x00\x1d"  # the group the client must send a share for
    extensions = versions + key_share
    body = (
        b"\x03\x03" + random + b"\x00" + b"\x13\x01" + b"\x00"
        + struct.pack("!H", len(extensions)) + extensions
    )  # fmt: skip
    handshake = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack("!H", len(handshake)) + handshake


# -- a real gate in a background thread ----------------------------------------------------------


class LoopbackFence:
    """Test-only guard around the real resolver: a destination off loopback is refused here.

    Tests must never send traffic off this machine, even when a regression breaks the gate's own
    internal-address checks (NAT64/6to4 forms would otherwise be dialled). A refusal by the fence has a
    distinct detail, so a test that expects ``internal-address`` still fails loudly on a regression."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def destination(self, host: Any, port: int, allow_internal: Any) -> Any:
        from proxy.core.decision import Reason
        from proxy.core.destination import DestinationRefused

        dest = await self.inner.destination(host, port, allow_internal)
        if dest.address is None or not ipaddress.ip_address(dest.address).is_loopback:
            raise DestinationRefused(
                Reason.DNS_FAILURE, f"test fence: {dest.address} is not loopback", dest.address
            )
        return dest


class RunningGate:
    """The real gate (mitmproxy + addons + core) on 127.0.0.1:<ephemeral>, in its own thread and loop,
    so blocking clients (curl, pip, git) can be driven from the test thread."""

    def __init__(
        self,
        policy_path: Path,
        nameservers: Sequence[str],
        sinks: Sequence[Sink] = (),
        *,
        resolver_kwargs: dict[str, Any] | None = None,
        gate_kwargs: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        loop: str = "asyncio",
    ) -> None:
        """``loop``: the event loop it runs on (``proxy.runtime.loop``: ``asyncio`` or ``uvloop``,
        which ``egress serve`` runs on when it is installed)."""
        from proxy.policy.loader import load_policy

        self.policy_path = policy_path
        self.policy = load_policy(policy_path)
        self.memory = MemorySink()
        self.emitter = Emitter([self.memory, *sinks])
        self.nameservers = list(nameservers)
        self.resolver_kwargs = resolver_kwargs or {}
        self.gate_kwargs = gate_kwargs or {}
        self.config = config or {}
        self.loop = loop
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="gate", daemon=True)

    def start(self) -> RunningGate:
        self._thread.start()
        if not self._ready.wait(WAIT * 2):
            raise RuntimeError("gate did not start")
        if self._error is not None:
            raise RuntimeError("gate failed to start") from self._error
        return self

    def _run(self) -> None:
        try:
            from proxy.runtime.loop import loop_factory

            asyncio.run(self._main(), loop_factory=loop_factory(self.loop))
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        from addons.master import Gate, GateConfig
        from proxy.core.destination import DestinationCheck
        from proxy.destinations.resolver import Resolver

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        resolver = Resolver(nameservers=self.nameservers, **self.resolver_kwargs)
        self.gate = Gate(
            GateConfig(**{"listen_host": "127.0.0.1", "listen_port": 0, **self.config}),
            lambda: self.policy,
            self.emitter,
            resolver,
            destinations=LoopbackFence(DestinationCheck(resolver)),
            **self.gate_kwargs,
        )
        await self.gate.start()
        self.port = self.gate.listen_address[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.gate.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        """The CA certificate an inspecting gate signs with (a client of its tunnels trusts it)."""
        return Path(self.config["confdir"]) / "mitmproxy-ca-cert.pem"

    @property
    def decisions(self) -> list[Decision]:
        return list(self.memory.decisions)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT * 2)


# -- curl ----------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    returncode: int
    status: int
    headers: dict[str, str]
    body: str
    stderr: str


def curl(
    url: str,
    proxy: str | None,
    *args: str,
    cacert: Path | None = None,
    timeout: float = WAIT,
) -> CurlResult:
    """Run the real curl binary; returns exit code, final HTTP status, headers (lower-case) and body."""
    cmd = ["curl", "-sS", "--max-time", str(timeout), "-D", "-", "-o", "-"]
    if proxy is not None:
        cmd += ["--proxy", proxy]
    else:
        cmd += ["--noproxy", "*"]
    if cacert is not None:
        cmd += ["--cacert", str(cacert)]
    cmd += [*args, url]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout + 5, env=clean_env())
    out = proc.stdout.decode("utf-8", "replace")
    status, body = 0, out
    headers: dict[str, str] = {}
    blocks = out.split("\r\n\r\n")
    # The last header block (after CONNECT's "200 Connection established") holds the final status.
    idx = 0
    while idx < len(blocks) and blocks[idx].startswith("HTTP/"):
        lines = blocks[idx].split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        idx += 1
    body = "\r\n\r\n".join(blocks[idx:])
    return CurlResult(
        proc.returncode, status, headers, body, proc.stderr.decode("utf-8", "replace")
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any proxy setting, plus ``extra``: a client or an
    ``egress`` under test must use only the proxy the test gives it."""
    import os

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


def fresh_python(
    code: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """What ``python -c code args`` prints in a new interpreter (which must exit 0): what a fresh
    process imports, or does, without this test process's modules and threads."""
    import sys

    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def written_lines(path: Path) -> list[str]:
    """The complete lines of a log another process is appending to (a decision log, a journal).
    The gate writes each line with one ``write``, but a reader can still see part of a write in
    progress: a last line without its newline is left for the next read, never parsed half-written."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()
