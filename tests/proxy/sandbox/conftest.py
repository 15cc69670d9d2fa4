"""Real parts for the sandbox tests: counting listeners on the host's loopback, a stand-in gate,
a way to run Python probes inside a real sandbox, and ``egress`` run as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.sandbox.namespace import Listener, Sandbox, SandboxSpec
from tests.dnsfake import FakeDns
from tests.harness import (
    Canary,
    LoopbackServer,
    Upstream,
    clean_env,
    on_a_namespace_port,
    serving,
)

WAIT = 10.0
REPO = Path(__file__).resolve().parents[3]
EGRESS_WAIT = 30.0


def egress(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``egress ARGS`` in a subprocess, from the repository, without this process's proxy settings."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "proxy.app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EGRESS_WAIT,
        env=clean_env(),
        **kwargs,
    )


WORLD_POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: test-allowed
    hosts: [allowed.test]
    ports: [{port}]
"""


def allowed_test_policy(write_policy: Callable[[str], Path], port: int) -> Path:
    """A policy file allowing ``allowed.test`` on ``port`` only, with loopback opened (the test
    servers live there)."""
    return write_policy(WORLD_POLICY.format(port=port))


@pytest.fixture
def world(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, http_upstream: Upstream
) -> Iterator[tuple[Path, FakeDns, Upstream]]:
    """A policy allowing ``allowed.test`` (and only it) on the upstream's port; both names resolve
    to loopback, where the test policy opens internal addresses."""
    for name in ("allowed.test", "evil.test"):
        fake_dns.set(name, "A", ["127.0.0.1"])
        fake_dns.set(name, "AAAA", [])
    yield allowed_test_policy(write_policy, http_upstream.port), fake_dns, http_upstream


def CountingTcp(host: str = "127.0.0.1") -> Canary:
    """A TCP listener on the host side that counts accepted connections (on a port a connect in
    the sandbox never takes as its own: :func:`tests.harness.on_a_namespace_port`)."""
    return Canary(host)


class CountingUdp:
    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.port: int = on_a_namespace_port(lambda port: self._bind(host, port))
        self.sock.settimeout(0.2)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _bind(self, host: str, port: int) -> int:
        self.sock.bind((host, port))
        return port

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                _, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            with contextlib.suppress(OSError):
                self.sock.sendto(b"answer", addr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.sock.close()


@pytest.fixture
def host_tcp() -> Iterator[Canary]:
    yield from serving(CountingTcp())


@pytest.fixture
def host_udp() -> Iterator[CountingUdp]:
    yield from serving(CountingUdp())


class StandIn(LoopbackServer):
    """A stand-in gate: answers every connection on the sandbox's proxy listener with a marker."""

    def __init__(self, sock: socket.socket, marker: bytes) -> None:
        self.marker = marker
        super().__init__(sock=sock, name="stand-in-gate")

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.marker)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    netns: int
    helper_pid: int
    data: dict[str, object] = field(default_factory=dict)


LISTENERS = [
    Listener("proxy", "tcp", 3128),
    Listener("dns-udp", "udp", 53),
    Listener("dns-tcp", "tcp", 53),
]


def run_in_sandbox(
    argv: list[str],
    *,
    marker: bytes = b"stand-in gate\n",
    env: dict[str, str] | None = None,
    timeout: float = WAIT,
) -> Result:
    """Run argv in a real sandbox with a stand-in gate on its proxy listener; capture its output."""
    spec = SandboxSpec(
        argv=argv, env=env if env is not None else dict(os.environ), listeners=LISTENERS
    )
    sandbox = Sandbox.spawn(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stand_in = StandIn(sandbox.sockets["proxy"], marker)
    try:
        sandbox.start()
        out, err = sandbox.proc.communicate(timeout=timeout)
        code = sandbox.wait(timeout)
    finally:
        stand_in.stop()
        sandbox.close_sockets()
        if sandbox.proc.poll() is None:
            sandbox.kill()
    result = Result(code, out.decode(), err.decode(), sandbox.netns_inode, sandbox.pid)
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            result.data = json.loads(line)
    return result


def probe(code: str, **kwargs: object) -> Result:
    """Run a Python snippet inside the sandbox; it prints one JSON object as its last act."""
    return run_in_sandbox([sys.executable, "-I", "-c", code], **kwargs)  # type: ignore[arg-type]


def processes_in_netns(inode: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                found.append(int(entry))
    return found


@pytest.fixture
def sandbox_runner() -> Callable[..., Result]:
    return run_in_sandbox
