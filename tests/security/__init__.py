"""Attacks on the real gate: real mitmproxy on loopback, raw sockets and curl, counting upstreams and a
counting DNS server. Shared attack helpers live here so every test file speaks the same wire.

Every refusal is proven three ways, as ``shared/notes/threats.md`` demands: the client is refused, the
counting upstream accepted zero connections (and the DNS server saw zero queries where a name was
involved), and a decision with the expected reason was recorded.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.core.decision import Decision
from tests.harness import WAIT, LocalCA, RunningGate, Upstream, client_hello, recv_head

__all__ = [
    "CountingListener",
    "Reply",
    "client_hello",
    "exchange",
    "fresh_decisions",
    "inspected_h2",
    "parse_responses",
    "random_loopback",
    "start_gate_with",
]


def start_gate_with(directory: Path, policy: str, nameserver: str, **kwargs: Any) -> RunningGate:
    """A real gate on ``policy`` (YAML text), for module-scoped fixtures: starting and stopping a gate
    costs ~0.5 s, so attack tables share one gate and reset the counters between cases."""
    path = directory / "policy.yaml"
    path.write_text(textwrap.dedent(policy))
    return RunningGate(path, [nameserver], **kwargs).start()


def inspecting(directory: Path, ca: LocalCA) -> dict[str, Any]:
    """The gate config of a gate that inspects: its CA in ``directory``/state, trusting ``ca``'s upstreams."""
    return {"confdir": str(directory / "state"), "upstream_ca": str(ca.ca_path)}


@dataclass
class Reply:
    """What the gate sent back on one raw connection, and whether it closed it."""

    data: bytes
    closed: bool

    @property
    def head(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[0]

    @property
    def status(self) -> int:
        """Status of the *last* response head in the reply (after a CONNECT's 200), 0 if none."""
        heads = [part for part in self.data.split(b"\r\n\r\n") if part.startswith(b"HTTP/1.1 ")]
        return int(heads[-1].split(b" ")[1]) if heads else 0

    def statuses(self) -> list[int]:
        return [status for status, _, _ in parse_responses(self.data)]

    def tunnel_bytes(self) -> bytes:
        """What came back after a CONNECT's 200 (the upstream's side of the tunnel)."""
        marker = b"HTTP/1.1 200 Connection established\r\n\r\n"
        return self.data.split(marker, 1)[1] if marker in self.data else b""

    def header(self, name: str) -> str | None:
        """A header of the last response head, case-insensitive."""
        heads = [part for part in self.data.split(b"\r\n\r\n") if part.startswith(b"HTTP/1.1 ")]
        if not heads:
            return None
        for line in heads[-1].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


def exchange(
    gate: RunningGate,
    first: bytes,
    then: bytes | None = None,
    *,
    responses: int = 1,
    idle: float = 0.8,
    tunnel_reply: bool = False,
) -> Reply:
    """Send ``first`` to the gate; once its reply head arrived, send ``then`` (tunnel contents).

    Reads until ``responses`` complete HTTP responses arrived (a CONNECT's ``200 Connection
    established`` does not count), the gate closes the connection, or it stays silent for ``idle``
    seconds once its answer began (its first byte is waited for up to ``WAIT``: a gate held up on
    a loaded machine is slow, not silent). Every wait is bounded. ``tunnel_reply``: the upstream answers inside the tunnel (a
    control case), so wait up to ``WAIT`` for its first bytes and return once they are here.
    """
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    data = b""
    closed = False
    try:
        sock.sendall(first)
        if then is not None:
            sock.settimeout(WAIT)
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return Reply(data, True)
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(then)
        answered = len(data)  # what came before the wait for this answer (a CONNECT's 200)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and _complete_responses(data) < responses:
            if tunnel_reply and Reply(data, False).tunnel_bytes():
                break
            sock.settimeout(WAIT if tunnel_reply or len(data) == answered else idle)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        sock.close()
    return Reply(data, closed)


def parse_responses(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Complete HTTP/1.1 responses in ``data`` as (status, head, body), CONNECT's 200 included;
    parsing stops at the first thing that is not a response (tunnel bytes)."""
    out: list[tuple[int, bytes, bytes]] = []
    pos = 0
    while data.startswith(b"HTTP/1.1 ", pos):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = data[pos:end]
        status = int(head[9:12])
        if head.startswith(b"HTTP/1.1 200 Connection established"):
            out.append((status, head, b""))
            pos = end + 4
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        if len(data) < end + 4 + length:
            break
        out.append((status, head, data[end + 4 : end + 4 + length]))
        pos = end + 4 + length
    return out


def _complete_responses(data: bytes) -> int:
    """Final responses only: a CONNECT's 200 and an interim 1xx (``100 Continue``) are followed
    by the answer the caller waits for, which may arrive in a later read (``101`` ends the
    exchange: what follows is another protocol)."""
    return sum(
        1
        for status, head, _ in parse_responses(data)
        if not head.startswith(b"HTTP/1.1 200 Connection established")
        and (status >= 200 or status == 101)
    )


def inspected_h2(gate: RunningGate, host: str, port: int) -> ssl.SSLSocket:
    """A tunnel to ``host:port`` that the gate inspects, with HTTP/2 negotiated with the gate."""
    raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    assert recv_head(raw).startswith(b"HTTP/1.1 200"), "the tunnel was not admitted"
    ca = gate.ca
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(raw, server_hostname=host)
    assert sock.selected_alpn_protocol() == "h2"
    return sock


def fresh_decisions(gate: RunningGate, before: int) -> list[Decision]:
    return gate.decisions[before:]


def random_loopback() -> str:
    """A random 127.x.y.z, so fixed-port listeners (80, 22) do not collide with parallel runs."""
    rng = random.SystemRandom()
    return f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(2, 254)}"


def CountingListener(host: str, port: int) -> Upstream:
    """A canary on a *fixed* port (80, 22): tunnel handling in the gate is keyed on the well-known
    ports, so these attacks need a counting upstream on exactly those."""
    return Upstream("canary", host=host, port=port)
