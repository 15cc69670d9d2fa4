"""A client of the gate's front end that stops reading what the gate sends it.

Refusals keep a connection open for the client's next request (as mitmproxy does), so a client can
pipeline requests it knows are refused and never read the answers: once the socket buffers are
full, the gate is left waiting to send. That wait is bounded like any other silence on a
connection - the idle timeout - and the closing is recorded; without the bound the connection (and
its place under the client's cap) would be held for ever.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.limits import Limits
from tests.dnsfake import FakeDns
from tests.harness import WAIT, Upstream
from tests.security import start_gate_with

pytestmark = pytest.mark.timeout(120)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: allowed
    hosts: [allowed.test]
    ports: [{port}]
"""


@pytest.fixture()
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.loopback("allowed.test", "denied.test")
        yield server


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n",
        b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n",
    ],
    ids=["refused-connect", "refused-plain-get"],
)
def test_a_client_that_never_reads_its_refusals_is_closed_after_the_idle_timeout(
    tmp_path: Path, dns: FakeDns, head: bytes
) -> None:
    upstream = Upstream("allowed")
    running = start_gate_with(
        tmp_path,
        POLICY.format(port=upstream.port),
        dns.nameserver,
        config={"limits": Limits(idle_timeout=0.3)},
    )
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(2.0)
        with sock:
            sock.connect(("127.0.0.1", running.port))
            with contextlib.suppress(TimeoutError):  # the gate stops reading once it is stuck
                sock.sendall(head * 20000)
            deadline = time.monotonic() + 3 * WAIT
            while time.monotonic() < deadline:
                if "idle-timeout" in [d.reason for d in running.decisions]:
                    break
                time.sleep(0.05)
            reasons = [d.reason for d in running.decisions]
            assert "idle-timeout" in reasons, f"still held after {len(reasons)} refusals"
        assert upstream.accepted == 0
    finally:
        running.stop()
        upstream.stop()
