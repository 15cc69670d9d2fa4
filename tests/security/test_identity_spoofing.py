"""Threat class 12, second half: a sandbox claiming another sandbox's identity on a shared gate.

On a shared gate the only thing that names a sandbox is its proxy credential. Headers a client can set,
a credential switched half-way through a kept-alive connection, or a request that simply stops sending
the credential after the first one must never move traffic to another sandbox's (wider) policy.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Reason
from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream
from tests.security import (
    CountingListener,
    exchange,
    fresh_decisions,
    random_loopback,
    start_gate_with,
)

pytestmark = pytest.mark.timeout(60)

WEB_IP = random_loopback()


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.set("allowed.test", "A", ["127.0.0.1"])
        server.set("web.test", "A", [WEB_IP])
        yield server


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream
) -> Iterator[RunningGate]:
    from proxy.policy.identities import Identities, token_digest
    from proxy.policy.loader import load_policy

    directory: Path = tmp_path_factory.mktemp("identities")
    closed = directory / "closed.yaml"
    closed.write_text("version: 1\nrules:\n  - name: nothing\n    hosts: [nothing.test]\n")
    sandboxes = directory / "sandboxes.yaml"
    sandboxes.write_text(
        "version: 1\nsandboxes:\n"
        f"  - id: alpha\n    token_sha256: {token_digest('tok-alpha')}\n"
        f"  - id: beta\n    token_sha256: {token_digest('tok-beta')}\n    policy: closed.yaml\n"
    )
    beta_policy = load_policy(closed)
    running = start_gate_with(
        directory,
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: allowed
            hosts: [allowed.test]
            ports: [{plain.port}]
          - name: web
            hosts: [web.test]
            ports: [80]
        """,
        dns.nameserver,
        gate_kwargs={
            "identities": Identities.load(sandboxes),
            "sandbox_policies": {"beta": lambda: beta_policy},
        },
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(dns: FakeDns, plain: Upstream) -> None:
    dns.reset_queries()
    plain.reset()


def _auth(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def _get(port: int, path: str, *headers: str) -> bytes:
    lines = [f"GET http://allowed.test:{port}{path} HTTP/1.1", f"Host: allowed.test:{port}"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


def test_switching_credentials_on_a_kept_alive_connection_is_refused(
    gate: RunningGate, plain: Upstream
) -> None:
    """beta's policy allows nothing; alpha's allows allowed.test. Authenticating as beta first and
    then presenting alpha's credential on the same connection must not work either way round."""
    port = plain.port
    before = len(gate.decisions)
    reply = exchange(
        gate,
        _get(port, "/a", f"Proxy-Authorization: {_auth('alpha', 'tok-alpha')}")
        + _get(port, "/b", f"Proxy-Authorization: {_auth('beta', 'tok-beta')}"),
        responses=2,
    )
    assert reply.statuses()[0] == 200
    assert reply.statuses()[1:] in ([407], [])  # refused, or the connection was closed
    assert [target for _, target, _ in plain.requests] == ["/a"]
    assert all(d.sandbox_id in ("alpha", None) for d in fresh_decisions(gate, before))


def test_credential_must_accompany_every_request(gate: RunningGate, plain: Upstream) -> None:
    port = plain.port
    reply = exchange(
        gate,
        _get(port, "/a", f"Proxy-Authorization: {_auth('alpha', 'tok-alpha')}") + _get(port, "/b"),
        responses=2,
    )
    assert reply.statuses() == [200, 407]
    assert [target for _, target, _ in plain.requests] == ["/a"]


@pytest.mark.parametrize(
    "headers",
    [
        ("X-Egress-Sandbox-Id: alpha",),
        ("X-Egress-Sandbox: alpha", "X-Forwarded-For: 127.0.0.1"),
        (f"Proxy-Authorization: {_auth('ALPHA', 'tok-alpha')}",),  # ids are case-sensitive
        (f"Proxy-Authorization: {_auth('alpha', 'tok-beta')}",),  # another sandbox's token
        (f"Proxy-Authorization: {_auth('alpha', 'tok-alpha ')}",),
        ("Proxy-Authorization: Bearer tok-alpha",),
        (f"Proxy-Authorization: {_auth('alpha', '')}",),
    ],
    ids=["egress-header", "forwarded", "id-case", "other-token", "padded", "bearer", "empty"],
)
def test_forged_identities_are_refused(
    gate: RunningGate, dns: FakeDns, plain: Upstream, headers: tuple[str, ...]
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _get(plain.port, "/", *headers))
    assert reply.status == 407
    assert reply.header("x-egress-reason") == "proxy-auth-required"
    assert plain.accepted == 0 and dns.queries == []
    (decision,) = fresh_decisions(gate, before)
    assert decision.reason == Reason.PROXY_AUTH_REQUIRED


def test_connect_without_credential_is_refused_before_dns(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    reply = exchange(gate, f"CONNECT allowed.test:{plain.port} HTTP/1.1\r\n\r\n".encode())
    assert reply.status == 407
    assert plain.accepted == 0 and dns.queries == []


def test_narrow_sandbox_gets_its_own_policy_not_the_default(
    gate: RunningGate, plain: Upstream
) -> None:
    before = len(gate.decisions)
    reply = exchange(
        gate,
        f"CONNECT allowed.test:{plain.port} HTTP/1.1\r\n"
        f"Proxy-Authorization: {_auth('beta', 'tok-beta')}\r\n\r\n".encode(),
    )
    assert reply.status == 403
    assert plain.accepted == 0
    (decision,) = fresh_decisions(gate, before)
    assert (decision.sandbox_id, decision.reason) == ("beta", Reason.NO_MATCHING_RULE)


@pytest.fixture(scope="module")
def web80() -> Iterator[Upstream]:
    try:
        listener = CountingListener(WEB_IP, 80)
    except OSError as exc:
        pytest.skip(f"cannot bind {WEB_IP}:80 for the canary: {exc}")
    yield listener
    listener.stop()


def _port80_tunnel(gate: RunningGate, inner: bytes) -> list[int]:
    first = (
        "CONNECT web.test:80 HTTP/1.1\r\n"
        f"Proxy-Authorization: {_auth('alpha', 'tok-alpha')}\r\n\r\n"
    ).encode()
    return exchange(gate, first, inner).statuses()


def test_other_sandboxs_credential_inside_a_port80_tunnel_is_refused(
    gate: RunningGate, web80: Upstream
) -> None:
    web80.heads.clear()
    inner = (
        "GET / HTTP/1.1\r\nHost: web.test\r\n"
        f"Proxy-Authorization: {_auth('beta', 'tok-beta')}\r\n\r\n"
    ).encode()
    statuses = _port80_tunnel(gate, inner)
    assert statuses[0] == 200 and statuses[1:] in ([407], [])
    assert web80.heads == []


def test_requests_inside_an_authenticated_port80_tunnel_are_served(
    gate: RunningGate, web80: Upstream
) -> None:
    web80.heads.clear()
    statuses = _port80_tunnel(gate, b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
    assert statuses == [200, 200]
    assert len(web80.heads) == 1
