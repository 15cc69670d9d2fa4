"""Threat class 19, the evidence side: a decision never names another connection's process.

The evidence stamp names a decision's process by its connection's peer address (what a decision
carries); the checkpoint keeps each connection's lookup by peer until the connection closes. A
sandbox can make two connections share an address (it resets one the gate still serves, and binds
the same port again at once: a reset leaves no TIME_WAIT), and can make a lookup end after its
connection has closed (a sandbox of many processes is walked in the lookup thread). Real gate,
real ``SandboxProcesses`` bookkeeping and stamp; only the lookups' answers are scripted.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.attribution.process import Attribution
from proxy.attribution.procfs import SandboxProcesses
from proxy.attribution.stamp import SandboxFacts, Stamped
from tests.dnsfake import FakeDns
from tests.harness import WAIT, LoopbackServer, RunningGate, Upstream, recv_head, wait_until

pytestmark = pytest.mark.timeout(60)


def _process(pid: int, exe: str) -> Attribution:
    return Attribution(
        pid=pid, host_pid=1000 + pid, exe=exe, argv=(exe,), ppid=1, parents=(),
        exe_ids=frozenset({(1, pid)}), exes=frozenset({exe}),
    )  # fmt: skip


EVIL, GIT = _process(7, "/tmp/evil"), _process(8, "/usr/bin/git")


class Scripted(SandboxProcesses):
    """The real remember/forget/known; each lookup answers the next of ``answers`` once ``go``."""

    def __init__(self, answers: list[Attribution], *, walks: bool = False) -> None:
        super().__init__(1, ("127.0.0.1", 0))
        self.answers = answers
        self.walks = walks  # every lookup goes to the lookup thread
        self.go = threading.Event()
        self.started = threading.Event()
        if not walks:
            self.go.set()

    def attribute(self, peer: str, *, every_owner: bool = False, identity: bool = True) -> Any:
        self.started.set()
        self.go.wait(WAIT)
        return self.answers.pop(0)

    def attribute_now(self, peer: str, *, identity: bool = True) -> Any:
        if self.walks:
            raise BlockingIOError("the tree must be walked")
        return self.answers.pop(0)


class HeldFirst(LoopbackServer):
    """Answers the first request it reads once ``go`` is set, every later one at once."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.first = True
        super().__init__(threaded=True, name="upstream-held-first")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        while recv_head(conn):
            if self.first:
                self.first = False
                self.go.wait(WAIT)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.loopback("a.test")
        yield server


def _policy(tmp_path: Path, port: int) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: one\n    hosts: [a.test]\n    ports: [{port}]\n"
    )
    return policy


def _request(port: int, path: str) -> bytes:
    return f"GET http://a.test:{port}{path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode()


def test_a_reused_client_port_never_takes_another_connections_process(
    tmp_path: Path, dns: FakeDns
) -> None:
    upstream = HeldFirst()
    processes = Scripted([EVIL, GIT])
    gate = RunningGate(_policy(tmp_path, upstream.port), [dns.nameserver],
                       gate_kwargs={"processes": processes})  # fmt: skip
    gate.emitter = Stamped(gate.emitter, SandboxFacts(0, "root"), processes)  # as egress run
    gate.start()
    try:
        first = socket.socket()
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        first.connect(("127.0.0.1", gate.port))
        first.sendall(_request(upstream.port, "/evil"))  # held: its upstream answers later
        assert wait_until(lambda: any(d.path == "/evil" for d in gate.decisions))
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()  # a reset: the port is free at once, the gate still serves the connection

        second = socket.socket()
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.bind(("127.0.0.1", port))  # the same peer address, as the gate sees it
        second.settimeout(WAIT)
        second.connect(("127.0.0.1", gate.port))
        second.sendall(_request(upstream.port, "/one"))
        assert recv_head(second).startswith(b"HTTP/1.1 200")
        upstream.go.set()  # the first connection's answer comes; its client is gone: it ends
        assert wait_until(lambda: gate.gate.checkpoint.connections.active == 1)
        second.sendall(_request(upstream.port, "/two"))
        assert recv_head(second).startswith(b"HTTP/1.1 200")
        second.close()

        by_path = {d.path: d for d in gate.decisions}
        assert by_path["/evil"].exe == EVIL.exe
        # Decided while both were open: the address names neither, never the other's process.
        assert by_path["/one"].exe is None
        # The first connection's end forgot its own process only: the second's is named again.
        assert by_path["/two"].exe == GIT.exe
    finally:
        gate.stop()
        upstream.stop()


def test_a_lookup_answered_after_its_connection_closed_is_not_kept(
    tmp_path: Path, dns: FakeDns
) -> None:
    upstream = Upstream("a")
    processes = Scripted([EVIL], walks=True)
    gate = RunningGate(
        _policy(tmp_path, upstream.port), [dns.nameserver], gate_kwargs={"processes": processes},
        config={"fast_plain_http": False},  # mitmproxy's layers: the request hook awaits it
    ).start()  # fmt: skip
    try:
        client = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        host, port = client.getsockname()
        peer = f"{host}:{port}"
        client.sendall(_request(upstream.port, "/"))
        assert processes.started.wait(WAIT)
        client.close()  # while its request's lookup runs
        assert wait_until(lambda: gate.gate.checkpoint.connections.active == 0)
        processes.go.set()
        assert wait_until(lambda: not processes.answers)  # the lookup has answered
        assert not wait_until(lambda: processes.known(peer) is not None, timeout=1)
        assert peer not in processes._known  # nothing left that no close would forget
    finally:
        processes.go.set()
        gate.stop()
        upstream.stop()
