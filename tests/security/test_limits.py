"""Limits hold under floods and slow or oversized input, every refusal is a recorded decision with its
own reason, and one sandbox's flood never stops another sandbox's traffic (threat 13)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import selectors
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Decision, Reason, Verdict
from proxy.core.limits import Limits
from proxy.policy.identities import Identities, token_digest
from tests.dnsfake import FakeDns
from tests.harness import WAIT, RunningGate, Upstream, recv_head, serving, wait_until
from tests.proxy.app.test_serve import Serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def plain() -> Iterator[Upstream]:
    yield from serving(Upstream("plain"))


def gate_with(
    write_policy: Callable[[str], Path],
    fake_dns: FakeDns,
    plain: Upstream,
    limits: Limits,
    **kwargs: object,
) -> RunningGate:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    policy = write_policy(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: allowed\n    hosts: [allowed.test]\n    ports: [{plain.port}]\n"
    )
    return RunningGate(policy, [fake_dns.nameserver], config={"limits": limits}, **kwargs).start()  # type: ignore[arg-type]


def get(port: int, target_port: int, extra: str = "") -> bytes:
    """The response head, or b"" when the gate closed the connection instead (a refused connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(
                f"GET http://allowed.test:{target_port}/ HTTP/1.1\r\n"
                f"Host: allowed.test:{target_port}\r\n{extra}\r\n".encode()
            )
            return recv_head(sock)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b"" or closed_within(sock, seconds)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def closed_count(socks: list[socket.socket], *, at_least: int, seconds: float) -> int:
    """How many of ``socks`` the gate closed, waiting until ``at_least`` are (or ``seconds`` pass):
    each closure is seen as it happens, however loaded the machine is. The gate sends nothing on a
    connection it keeps, so a readable socket is one it closed."""
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while len(closed) < at_least and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    ended = sock.recv(65536) == b""
                except ConnectionResetError:
                    ended = True
                if ended:
                    closed.add(sock)
                    selector.unregister(sock)
    return len(closed)


def reasons(gate: RunningGate, reason: Reason) -> list[Decision]:
    return [d for d in gate.decisions if d.reason is reason]


def test_every_request_head_on_a_keep_alive_connection_has_a_deadline(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    gate = gate_with(write_policy, fake_dns, plain, Limits(request_timeout=0.6))
    try:
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        head = (
            f"GET http://allowed.test:{plain.port}/ HTTP/1.1\r\nHost: allowed.test:{plain.port}\r\n"
        )
        sock.sendall((head + "\r\n").encode())
        assert recv_head(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # idle between requests is not a slow head
        sock.sendall(head.encode())  # the second head starts, and never finishes
        assert closed_within(sock, WAIT)
        sock.close()
        (timeout,) = reasons(gate, Reason.REQUEST_TIMEOUT)
        assert timeout.decision is Verdict.DENY
    finally:
        gate.stop()
    assert plain.accepted == 1


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("".join(f"X-{i}: v\r\n" for i in range(101)), b"HTTP/1.1 431"),
        ("X-Big: " + "a" * 70_000 + "\r\n", b"HTTP/1.1 431"),
    ],
    ids=["too-many-headers", "head-too-large"],
)
def test_oversized_heads_are_refused_and_recorded(
    write_policy: Callable[[str], Path],
    fake_dns: FakeDns,
    plain: Upstream,
    extra: str,
    status: bytes,
) -> None:
    gate = gate_with(write_policy, fake_dns, plain, Limits())
    try:
        assert get(gate.port, plain.port, extra).startswith(status)
        (refusal,) = reasons(gate, Reason.HEAD_TOO_LARGE)
        assert refusal.decision is Verdict.DENY
    finally:
        gate.stop()
    assert plain.accepted == 0


def test_an_overlong_request_line_is_refused(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    gate = gate_with(write_policy, fake_dns, plain, Limits())
    try:
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
            path = "/" + "a" * 9000
            sock.sendall(
                f"GET http://allowed.test:{plain.port}{path} HTTP/1.1\r\n"
                f"Host: allowed.test:{plain.port}\r\n\r\n".encode()
            )
            assert recv_head(sock).startswith(b"HTTP/1.1 431")
        assert reasons(gate, Reason.HEAD_TOO_LARGE)
    finally:
        gate.stop()
    assert plain.accepted == 0


def test_a_malformed_request_line_is_a_recorded_refusal(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    gate = gate_with(write_policy, fake_dns, plain, Limits())
    try:
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
            sock.sendall(b"GET http://allowed.test:%ZZ/ HTTP/1.1\r\n\r\n")
            assert recv_head(sock).startswith(b"HTTP/1.1 400")
        (bad,) = reasons(gate, Reason.BAD_REQUEST)
        assert bad.decision is Verdict.DENY and bad.detail
    finally:
        gate.stop()
    assert fake_dns.queries == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # origin-form to the proxy, no Host
        b"GET /x HTTP/1.1\r\nHost: \r\n\r\n",  # an empty Host
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 with prior knowledge, to the proxy
    ],
)
def test_a_request_naming_no_destination_is_a_recorded_refusal(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream, head: bytes
) -> None:
    """mitmproxy answers these with its own 400 before any hook sees the request: the refusal is
    recorded like every other (it was only on the wire)."""
    gate = gate_with(write_policy, fake_dns, plain, Limits())
    try:
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
            sock.sendall(head)
            assert recv_head(sock).startswith(b"HTTP/1.1 400")
        assert wait_until(lambda: len(reasons(gate, Reason.BAD_REQUEST)) == 1)
        (bad,) = reasons(gate, Reason.BAD_REQUEST)
        assert bad.decision is Verdict.DENY and "no destination" in (bad.detail or "")
    finally:
        gate.stop()
    assert fake_dns.queries == [] and plain.accepted == 0


def test_new_connections_per_second_are_limited_per_client(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    limits = Limits(new_connections_per_second=2, new_connections_burst=5)
    gate = gate_with(write_policy, fake_dns, plain, limits)
    try:
        answers = [get(gate.port, plain.port, "Connection: close\r\n") for _ in range(12)]
        served = sum(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert 5 <= served < 12
        limited = reasons(gate, Reason.RATE_LIMIT)
        assert len(limited) == 12 - served
        assert all(d.decision is Verdict.DENY for d in limited)
    finally:
        gate.stop()
    assert plain.accepted == served


def test_the_whole_gate_cap_refuses_and_then_recovers(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    gate = gate_with(write_policy, fake_dns, plain, Limits(max_connections=6))
    try:
        held = [socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) for _ in range(6)]
        extra = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        assert closed_within(extra, WAIT)
        (refusal,) = reasons(gate, Reason.CONNECTION_LIMIT)
        assert "maximum of 6" in (refusal.detail or "")
        for sock in [*held, extra]:
            sock.close()
        deadline = time.monotonic() + WAIT
        while not get(gate.port, plain.port).startswith(b"HTTP/1.1 200"):
            assert time.monotonic() < deadline, "the gate never served again"
            time.sleep(0.1)
    finally:
        gate.stop()


def test_a_flooding_sandbox_does_not_stop_another(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream
) -> None:
    """Two sandboxes, each on its own listener (as `egress run` sandboxes are): one holds more
    connections than its cap and keeps opening more; the other is served at once throughout."""
    limits = Limits(max_connections_per_client=50, new_connections_per_second=1000)
    gate = gate_with(write_policy, fake_dns, plain, limits)
    listeners = {}
    try:
        for sandbox in ("flood", "calm"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
            listeners[sandbox] = sock.getsockname()[1]
            assert gate._loop is not None
            asyncio.run_coroutine_threadsafe(
                gate.gate.add_listener(sock, sandbox_id=sandbox), gate._loop
            ).result(WAIT)
        flood = []
        for _ in range(120):
            try:
                flood.append(
                    socket.create_connection(("127.0.0.1", listeners["flood"]), timeout=WAIT)
                )
            except OSError:
                break
        started = time.monotonic()
        calm = [get(listeners["calm"], plain.port) for _ in range(5)]
        elapsed = time.monotonic() - started
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in calm)
        assert elapsed < WAIT  # served, not starved (a bound, not a speed claim)
        # The kernel completes the flood's handshakes before the gate accepts them: the calm
        # sandbox may be served while some are still in the backlog. Each refusal is recorded
        # before its connection is closed, so count them once the gate has closed all 70.
        assert len(flood) == 120
        assert closed_count(flood, at_least=70, seconds=WAIT) == 70
        refused = [d for d in reasons(gate, Reason.CONNECTION_LIMIT) if d.sandbox_id == "flood"]
        assert len(refused) == 70
        assert not [d for d in gate.decisions if d.sandbox_id == "calm" and not d.allowed]
        for sock in flood:
            sock.close()
    finally:
        gate.stop()


def test_sandboxes_sharing_an_address_do_not_share_a_cap(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, plain: Upstream, tmp_path: Path
) -> None:
    """On a shared gate, a credential moves a connection from its address's count to its sandbox's:
    one sandbox at its cap does not lock out another connecting from the same address."""
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text(
        "version: 1\nsandboxes:\n"
        f"  - id: alpha\n    token_sha256: {token_digest('tok-alpha')}\n"
        f"  - id: beta\n    token_sha256: {token_digest('tok-beta')}\n"
    )
    gate = gate_with(
        write_policy,
        fake_dns,
        plain,
        Limits(max_connections_per_client=3),
        gate_kwargs={"identities": Identities.load(sandboxes)},
    )

    def auth(sandbox: str) -> str:
        token = base64.b64encode(f"{sandbox}:tok-{sandbox}".encode()).decode()
        return f"Proxy-Authorization: Basic {token}\r\n"

    def tunnel(sandbox: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        sock.sendall(f"CONNECT allowed.test:{plain.port} HTTP/1.1\r\n{auth(sandbox)}\r\n".encode())
        return sock, recv_head(sock)

    try:
        held = [tunnel("alpha") for _ in range(3)]
        assert all(head.startswith(b"HTTP/1.1 200") for _, head in held)
        sock, head = tunnel("alpha")
        assert head.startswith(b"HTTP/1.1 403") and b"connection-limit" in head
        sock.close()
        other, head = tunnel("beta")
        assert head.startswith(b"HTTP/1.1 200"), head
        other.close()
        for sock, _ in held:
            sock.close()
    finally:
        gate.stop()


def served_locally(port: int, target: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(
                f"GET http://localhost:{target}/ HTTP/1.1\r\nHost: localhost:{target}\r\n\r\n".encode()
            )
            return recv_head(sock).startswith(b"HTTP/1.1 200")
    except OSError:  # still refused (reset, or closed before it answered): asked again
        return False


def test_out_of_file_descriptors_refuses_and_recovers(tmp_path: Path, plain: Upstream) -> None:
    """A gate whose open-file limit is low fits its connection cap to it: the connections it cannot
    carry are refused (and recorded), it never stops, and it serves again once they close."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: local\n    hosts: [localhost]\n    ports: [{plain.port}]\n"
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    log = tmp_path / "decisions.jsonl"
    gate = Serve(
        "--policy", str(policy), "--hosts-file", str(hosts), "--decision-log", str(log),
        "--nameserver", "127.0.0.1:9", wrapper=["prlimit", "--nofile=160:160"],
    )  # fmt: skip
    port = gate.port
    held: list[socket.socket] = []
    try:
        for _ in range(120):  # (160 - 80) // 2 = 40 fit (limits.DESCRIPTOR_RESERVE); the rest go
            held.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        closed = closed_count(held, at_least=60, seconds=WAIT)
        assert closed >= 60, f"{closed} of 120 closed; the gate said:\n{''.join(gate.lines)}"
        assert gate.proc.poll() is None, "".join(gate.lines)
        for sock in held:
            sock.close()
        held.clear()
        deadline = time.monotonic() + WAIT
        while not served_locally(port, plain.port):
            assert time.monotonic() < deadline, "never served again:\n" + "".join(gate.lines)
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        gate.stop()
    recorded = log.read_text()
    assert "connection-limit" in recorded, recorded[-2000:] + "".join(gate.lines)


def test_an_idle_relayed_tunnel_is_closed_and_recorded(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, tmp_path: Path
) -> None:
    import ssl

    from tests.harness import LocalCA

    ca = LocalCA(tmp_path, ["allowed.test"])
    tls = Upstream("tls", tls=ca.server_context())
    gate = gate_with(write_policy, fake_dns, tls, Limits(idle_timeout=1.0))
    try:
        raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        raw.sendall(f"CONNECT allowed.test:{tls.port} HTTP/1.1\r\n\r\n".encode())
        assert recv_head(raw).startswith(b"HTTP/1.1 200")
        client = ssl.create_default_context(cafile=str(ca.ca_path))
        conn = client.wrap_socket(raw, server_hostname="allowed.test")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        assert recv_head(conn).startswith(b"HTTP/1.1 200")  # traffic keeps it open
        assert not reasons(gate, Reason.IDLE_TIMEOUT)
        # Then silence both ways: the gate closes it (within two idle periods) and says why.
        conn.settimeout(WAIT)
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert conn.recv(1) == b""
        conn.close()
        (idle,) = reasons(gate, Reason.IDLE_TIMEOUT)
        assert idle.decision is Verdict.DENY and idle.host == "allowed.test"
    finally:
        gate.stop()
        tls.stop()
    assert tls.accepted == 1


def test_a_tunnel_whose_client_stops_reading_is_ended_at_the_idle_timeout(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, tmp_path: Path
) -> None:
    """The relay stalls writing to a client that reads nothing (its buffers full, no byte moving
    either way): the idle timeout ends the tunnel for good - recorded, the client's side closed,
    and the relay itself finished (its connection's closing is recorded) - instead of holding the
    connection and the upstream for ever."""
    import ssl

    from tests.harness import LocalCA

    ca = LocalCA(tmp_path, ["allowed.test"])
    tls = Upstream("tls", tls=ca.server_context(), body_size=64 << 20)
    gate = gate_with(write_policy, fake_dns, tls, Limits(idle_timeout=1.0))
    try:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # backs up at once
        raw.settimeout(WAIT)
        raw.connect(("127.0.0.1", gate.port))
        raw.sendall(f"CONNECT allowed.test:{tls.port} HTTP/1.1\r\n\r\n".encode())
        assert recv_head(raw).startswith(b"HTTP/1.1 200")
        client = ssl.create_default_context(cafile=str(ca.ca_path))
        conn = client.wrap_socket(raw, server_hostname="allowed.test")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        # Read nothing more: the 64 MiB body fills every buffer on the way and stops moving.
        deadline = time.monotonic() + WAIT
        while not reasons(gate, Reason.IDLE_TIMEOUT):
            assert time.monotonic() < deadline, "a stalled tunnel was never ended"
            time.sleep(0.05)
        (idle,) = reasons(gate, Reason.IDLE_TIMEOUT)
        assert idle.host == "allowed.test"
        while not [n for n, _ in gate.memory.events if n == "egress.connection.closed"]:
            assert time.monotonic() < deadline, "the relay of an ended tunnel never finished"
            time.sleep(0.05)
        got = 0
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            for _ in range(10_000):  # what was buffered, then the end
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
        assert got < 64 << 20  # ended, not relayed to the end
        conn.close()
    finally:
        gate.stop()
        tls.stop()
