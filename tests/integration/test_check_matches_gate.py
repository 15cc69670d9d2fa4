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

from proxy.app.check import check, parse_target, request_target
from proxy.core.decision import Decision, Kind, Reason, Request
from proxy.core.requests import HttpHead
from proxy.policy.loader import load_policy
from tests.dnsfake import FakeDns
from tests.harness import WAIT, RunningGate, on_a_free_port, recv_head

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
    def start(gate_port: int) -> tuple[Path, RunningGate]:
        path = write_policy(POLICY.format(mode=mode, gate_port=gate_port))
        return path, start_gate(path, config={"listen_port": gate_port})

    _, (path, gate) = on_a_free_port(start)
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


# -- request rules ---------------------------------------------------------------------------------

REQUEST_POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: read
    hosts: [allowed.test]
    methods: [GET, HEAD]
    paths: ["/myorg/**"]
    paths_case: insensitive
  - name: graphql
    hosts: [allowed.test]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [query]
  - name: no-push
    action: deny
    hosts: [allowed.test]
    query: {service: git-receive-pack}
  - name: plain-read
    hosts: [plain.test]
    ports: [80]
    methods: [GET]
  - name: passthrough
    hosts: [open.test]
"""

# (method, URL, body)
REQUEST_TARGETS: list[tuple[str, str, bytes | None]] = [
    ("GET", "https://allowed.test/myorg/repo", None),
    ("GET", "https://allowed.test/MyOrg/repo?x=1", None),
    ("DELETE", "https://allowed.test/myorg/repo", None),
    ("GET", "https://allowed.test/other/repo", None),
    ("GET", "https://allowed.test/myorg/../other", None),
    ("GET", "https://allowed.test/myorg/%2e%2e/other", None),
    ("GET", "https://allowed.test/myorg/repo?_method=DELETE", None),
    ("GET", "https://allowed.test/myorg/r/info/refs?service=git-receive-pack", None),
    ("POST", "https://allowed.test/graphql", b'{"query": "{ viewer { login } }"}'),
    ("POST", "https://allowed.test/graphql", b'{"query": "mutation { x }"}'),
    ("POST", "https://allowed.test/graphql", b"not json"),
    ("PUT", "https://open.test/anything", b"x"),
    ("GET", "https://nowhere.test/x", None),
    ("GET", "http://plain.test/anything", None),
    ("POST", "http://plain.test/anything", b"x"),
]


def live_request(
    gate: RunningGate, ca: Path, method: str, url: str, body: bytes | None
) -> Decision:
    """Send one request through the gate as a client would (inside TLS to the gate for https);
    return the last decision it recorded."""
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    authority = f"{parts.hostname}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = body or b""
    before = len(gate.decisions)
    with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as raw:
        if parts.scheme == "https":
            raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            if not recv_head(raw).startswith(b"HTTP/1.1 200"):
                return gate.decisions[before:][0]
            context = ssl.create_default_context(cafile=str(ca))
            try:
                sock: socket.socket = context.wrap_socket(raw, server_hostname=parts.hostname)
            except (
                ssl.SSLError,
                OSError,
            ):  # not inspected: relayed to an upstream that is not there
                return gate.decisions[before:][-1]
            line = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\n"
        else:
            sock = raw
            line = f"{method} http://{authority}{target} HTTP/1.1\r\nHost: {authority}\r\n"
        sock.sendall(f"{line}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        recv_head(sock)
    fresh = [d for d in gate.decisions[before:] if d.kind in (Kind.REQUEST, Kind.HTTP)]
    return fresh[-1] if fresh else gate.decisions[before:][-1]


def test_check_and_the_gate_agree_on_request_rules(
    fake_dns: FakeDns,
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    tmp_path: Path,
) -> None:
    for name in ("allowed.test", "plain.test", "open.test"):
        fake_dns.set(name, "A", ["127.0.0.1"])
    path = write_policy(REQUEST_POLICY)
    confdir = tmp_path / "state"
    gate = start_gate(path, config={"confdir": str(confdir)})
    ca = confdir / "mitmproxy-ca-cert.pem"
    policy = load_policy(path)
    reasons = set()
    for method, url, body in REQUEST_TARGETS:
        _, host, port, _, _ = parse_target(url, method)
        target = request_target(url)
        request = Request(
            Kind.HTTP if url.startswith("http://") else Kind.REQUEST,
            host,
            port,
            method,
            target.partition("?")[0],
            http=HttpHead(method, target, body_size=len(body or b"")),
        )
        dry = asyncio.run(
            check(policy, request, resolve=True, nameservers=[fake_dns.nameserver], body=body)
        )
        real = live_request(gate, ca, method, url, body)
        assert (dry.decision, dry.reason, dry.rule) == (real.decision, real.reason, real.rule), (
            method,
            url,
            dry.detail,
            real.detail,
        )
        reasons.add(dry.reason)
    # the table reaches every outcome of the request step
    assert {
        Reason.ALLOWED_BY_RULE,
        Reason.REQUEST_NOT_ALLOWED,
        Reason.AMBIGUOUS_REQUEST,
        Reason.DENIED_BY_RULE,
        Reason.NO_MATCHING_RULE,
    } <= reasons


def test_the_cli_decides_request_rules(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(REQUEST_POLICY)
    base = ["--policy", str(path), "--json"]
    ok = subprocess.run(
        [EGRESS, "check", *base, "https://allowed.test/myorg/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert (json.loads(ok.stdout)["kind"], json.loads(ok.stdout)["rule"]) == ("request", "read")
    push = subprocess.run(
        [EGRESS, "check", *base, "--method", "POST", "--data", '{"query": "mutation { x }"}',
         "https://allowed.test/graphql"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert push.returncode == 1
    assert json.loads(push.stdout)["reason"] == "request-not-allowed"
