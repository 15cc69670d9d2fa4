"""``egress check --resolve`` and a live gate agree, target by target, in enforce and report mode.

The gate is real (mitmproxy on loopback, the real resolver against a counting DNS server); ``check``
runs the same checkpoint in-process and through the CLI. Every allowed destination resolves to
loopback, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.app.check import check, parse_target
from proxy.core.decision import Decision, Kind, Request
from proxy.policy.loader import load_policy
from tests.dnsfake import FakeDns
from tests.harness import WAIT, RunningGate

pytestmark = pytest.mark.timeout(120)

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"

POLICY = """
version: 1
mode: {mode}
allow_internal: [127.0.0.0/8]
rules:
  - name: names
    hosts: [allowed.test, "**.example.test"]
    ports: [80, 443]
  - name: any-ip
    cidrs: [0.0.0.0/0, "::/0"]
    ports: [443, {gate_port}]
  - name: blocked
    action: deny
    hosts: [blocked.example.test]
"""

TARGETS = [
    "allowed.test:443",
    "http://allowed.test/simple/",
    "inside.example.test:443",
    "meta.example.test:443",
    "blocked.example.test:443",
    "allowed.test:22",
    "nowhere.test:443",
    "http://nowhere.test/",
    "gone.example.test:443",
    "169.254.169.254:443",
    "2852039166:443",
    "[::ffff:10.0.0.1]:443",
    "[fd00:ec2::254]:443",
    "127.0.0.1:443",
    "127.0.0.1:{gate_port}",
    "0.0.0.0:{gate_port}",
]


def live(gate: RunningGate, target: str) -> Decision:
    """Send the target through the gate as a client would; return the decision it recorded."""
    kind, host, port, _, path = parse_target(target, None)
    authority = f"{host}:{port}"
    if kind == "connect":
        wire = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    else:
        wire = f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    before = len(gate.decisions)
    with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
        sock.sendall(wire.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    fresh = gate.decisions[before:]
    assert fresh, f"no decision for {target}"
    return fresh[0]


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_check_and_the_gate_agree(
    mode: str,
    fake_dns: FakeDns,
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    tmp_path: Path,
) -> None:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("inside.example.test", "A", ["10.1.2.3"])
    fake_dns.set("meta.example.test", "AAAA", ["fd00:ec2::254"])
    fake_dns.set("blocked.example.test", "A", ["127.0.0.1"])
    # The policy opens the gate's own port (as a careless allow-all rule would), so pick it first.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        gate_port = free.getsockname()[1]
    path = write_policy(POLICY.format(mode=mode, gate_port=gate_port))
    gate = start_gate(path, config={"listen_port": gate_port})
    policy = load_policy(path)
    listeners = [("127.0.0.1", gate.port)]
    for template in TARGETS:
        target = template.format(gate_port=gate.port)
        kind, host, port, method, req_path = parse_target(target, None)
        dry = asyncio.run(
            check(
                policy,
                Request(Kind(kind), host, port, method, req_path),
                resolve=True,
                nameservers=[fake_dns.nameserver],
                listeners=listeners,
            )
        )
        real = live(gate, target)
        assert (dry.decision, dry.reason, dry.rule) == (real.decision, real.reason, real.rule), (
            target,
            dry.detail,
            real.detail,
        )


def test_the_cli_gives_the_same_answer(fake_dns: FakeDns, tmp_path: Path) -> None:
    fake_dns.set("inside.example.test", "A", ["10.1.2.3"])
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode="enforce", gate_port=3128))
    args = ["--policy", str(path), "--resolve", "--nameserver", fake_dns.nameserver, "--json"]
    result = subprocess.run(
        [EGRESS, "check", *args, "inside.example.test:443"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["reason"] == "internal-address"
