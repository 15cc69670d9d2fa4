"""`egress connect`: stdio over a CONNECT tunnel, through the real gate, for ssh and git."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.sandbox.connect import connect_request, proxy_from_env
from proxy.sandbox.env import ProxyAddress
from tests.dnsfake import FakeDns
from tests.harness import LoopbackServer, RunningGate, serving
from tests.proxy.sandbox.conftest import allowed_test_policy

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[3]
WAIT = 20.0


class FakeSsh(LoopbackServer):
    """Sends an SSH banner and records the first line the client sends back.

    The gate passes non-TLS tunnel contents only on port 22 (and only if they are SSH), so this
    listens on port 22 of a random 127/8 address: no clash with a real sshd or a parallel run."""

    def __init__(self) -> None:
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        self.client_banners: list[bytes] = []
        try:
            super().__init__(host, 22, name="fake-ssh")
        except PermissionError:
            pytest.skip("binding port 22 needs root")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.sendall(b"SSH-2.0-egress-test\r\n")
        self.client_banners.append(conn.recv(200).split(b"\r\n")[0])


@pytest.fixture
def fake_ssh() -> Iterator[FakeSsh]:
    yield from serving(FakeSsh())


def test_connect_request_format() -> None:
    assert connect_request("github.com", 22, ProxyAddress("127.0.0.1", 3128)) == (
        b"CONNECT github.com:22 HTTP/1.1\r\nHost: github.com:22\r\n\r\n"
    )
    with_auth = connect_request("::1", 22, ProxyAddress("127.0.0.1", 3128, "sbx", "tok"))
    assert with_auth.startswith(b"CONNECT [::1]:22 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic c2J4OnRvaw==\r\n" in with_auth


@pytest.mark.parametrize("host", ["a\r\nX: y", "a b", "", "a@b", "a/b", "a\0"])
def test_connect_request_rejects_injection(host: str) -> None:
    with pytest.raises(ValueError):
        connect_request(host, 22, ProxyAddress("127.0.0.1", 3128))


def test_proxy_from_env_prefers_egress_proxy() -> None:
    env = {"HTTPS_PROXY": "http://a:1", "EGRESS_PROXY": "http://b:2"}
    assert proxy_from_env(env) == ProxyAddress("b", 2)
    assert proxy_from_env({}) is None


def _connect(gate: RunningGate, port: int, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "connect", "allowed.test", str(port), "--proxy", gate.url],
        input=data, capture_output=True, timeout=WAIT, cwd=REPO,
    )  # fmt: skip


def test_stdio_through_the_gate(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    fake_dns: FakeDns,
    fake_ssh: FakeSsh,
) -> None:
    fake_dns.set("allowed.test", "A", [fake_ssh.host])
    gate = start_gate(allowed_test_policy(write_policy, 22))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "connect", "allowed.test", "22", "--proxy", gate.url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"SSH-2.0-stdio-test\r\n")  # like ssh: keep stdin open meanwhile
        proc.stdin.flush()
        assert proc.stdout.readline() == b"SSH-2.0-egress-test\r\n"
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fake_ssh.accepted == 1
    assert fake_ssh.client_banners == [b"SSH-2.0-stdio-test"]


def test_refused_port_exits_1_with_the_reason(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    fake_dns: FakeDns,
    fake_ssh: FakeSsh,
) -> None:
    fake_dns.set("allowed.test", "A", [fake_ssh.host])
    gate = start_gate(allowed_test_policy(write_policy, 443))  # the rule does not list port 22
    result = _connect(gate, 22, b"")
    assert result.returncode == 1
    assert b"refused allowed.test" in result.stderr and b"403" in result.stderr
    assert fake_ssh.accepted == 0


@pytest.mark.netns
def test_git_ssh_command_tunnels_ssh_through_the_gate_from_inside_a_sandbox(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, fake_ssh: FakeSsh
) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("ssh is not installed")
    fake_dns.set("allowed.test", "A", [fake_ssh.host])
    policy = allowed_test_policy(write_policy, 22)
    script = (
        'eval "$GIT_SSH_COMMAND -p 22 -o BatchMode=yes -o ConnectTimeout=10 '
        '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null git@allowed.test true"; '
        "echo ssh=$?"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         fake_dns.nameserver, "--", "sh", "-c", script],
        capture_output=True, text=True, timeout=WAIT * 2, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fake_ssh.accepted == 1, result.stderr
    assert fake_ssh.client_banners and fake_ssh.client_banners[0].startswith(b"SSH-2.0-OpenSSH")
    assert "1 request(s) allowed, 0 refused" in result.stderr
