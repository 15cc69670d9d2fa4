"""Destination safety end to end: the real gate, real curl, a counting DNS server and counting listeners.

Every address a test could be steered to is a loopback listener that counts accepted connections:
the allowed upstream listens on 127.0.0.2 (opened by ``allow_internal: [127.0.0.2/32]``) and a
*canary* listens on 127.0.0.1 on the same port (never opened). A name whose answers include
127.0.0.1 must reach the upstream or nothing, never the canary; a refusal must leave both at zero.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.core.decision import Decision, Reason, Verdict
from tests.dnsfake import FakeDns
from tests.harness import WAIT, Canary, LocalCA, RunningGate, Upstream, curl

pytestmark = pytest.mark.timeout(90)

NAME = "allowed.test"  # in the test CA's certificate, so TLS through the tunnel verifies


@dataclass
class Pair:
    upstream: Upstream  # the address the policy opened
    canary: Canary  # same port, an address that must never be reached

    @property
    def port(self) -> int:
        return self.upstream.port

    def untouched(self) -> bool:
        return self.upstream.accepted == 0 and self.canary.accepted == 0


def _pair(name: str, upstream_host: str, canary_host: str, tls: LocalCA | None) -> Pair:
    for _ in range(20):  # the canary needs the upstream's ephemeral port on its own address
        context = tls.server_context() if tls is not None else None
        upstream = Upstream(name, tls=context, host=upstream_host)
        try:
            return Pair(upstream, Canary(canary_host, upstream.port))
        except OSError:
            upstream.stop()
    raise RuntimeError("no port free on both addresses")


@pytest.fixture(params=["https", "http"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(scheme: str, test_ca: LocalCA) -> Iterator[Pair]:
    p = _pair(
        f"{scheme}-upstream", "127.0.0.2", "127.0.0.1", test_ca if scheme == "https" else None
    )
    yield p
    p.upstream.stop()
    p.canary.stop()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def pair6(scheme: str, test_ca: LocalCA) -> Iterator[Pair]:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    p = _pair(f"{scheme}-upstream6", "::1", "127.0.0.1", test_ca if scheme == "https" else None)
    yield p
    p.upstream.stop()
    p.canary.stop()


def _policy(write_policy: Callable[[str], Path], port: int, allow_internal: list[str]) -> Path:
    opened = (
        f"allow_internal: [{', '.join(repr(n) for n in allow_internal)}]" if allow_internal else ""
    )
    return write_policy(
        f"""
        version: 1
        {opened}
        rules:
          - name: test-allowed
            hosts: [{NAME}]
            ports: [{port}]
          - name: literals
            cidrs: [127.0.0.0/8, 169.254.0.0/16, "::1/128", "64:ff9b::/96", "2002::/16",
                    "fd00:ec2::/32"]
            ports: [{port}]
        """
    )


@pytest.fixture
def gate_with(
    write_policy: Callable[[str], Path], start_gate: Callable[..., RunningGate]
) -> Callable[..., RunningGate]:
    def make(
        port: int, allow_internal: list[str] | None = None, **resolver_kwargs: object
    ) -> RunningGate:
        policy = _policy(write_policy, port, allow_internal or [])
        return start_gate(policy, resolver_kwargs=resolver_kwargs)

    return make


def _fetch(gate: RunningGate, scheme: str, port: int, test_ca: LocalCA, *more: str) -> list[int]:
    """Fetch ``NAME`` through the gate with real curl, several URLs on one connection where curl can
    reuse it; returns one status per URL: the HTTP status, or the CONNECT status when the tunnel was
    refused (0 when there was neither)."""
    urls = [f"{scheme}://{NAME}:{port}/{path}" for path in ("first", *more)]
    cmd = [
        "curl",
        "-s",
        "--max-time",
        str(WAIT),
        "--proxy",
        gate.url,
        "--cacert",
        str(test_ca.ca_path),
    ]
    for url in urls:
        cmd += ["-o", os.devnull, "-w", "%{http_code} %{http_connect}\\n", url]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run(cmd, capture_output=True, timeout=WAIT + 5, env=env, text=True)
    statuses = []
    for line in proc.stdout.splitlines():
        code, connect = (int(x) for x in line.split())
        statuses.append(code if code else connect)
    return statuses


def _destination_decisions(gate: RunningGate) -> list[Decision]:
    return [d for d in gate.decisions if d.kind in ("connect", "http")]


# --- the allowed case: exactly the checked address ----------------------------------------------


def test_allowed_name_connects_to_exactly_the_checked_address(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    fake_dns.set(NAME, "A", ["127.0.0.2"])
    gate = gate_with(pair.port, ["127.0.0.2/32"])
    assert _fetch(gate, scheme, pair.port, test_ca) == [200]
    assert pair.upstream.accepted == 1
    assert pair.canary.accepted == 0
    (decision,) = _destination_decisions(gate)
    assert (decision.decision, decision.address) == (Verdict.ALLOW, "127.0.0.2")


def test_mixed_answers_never_reach_the_unopened_address(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    # TTL 0 and no floor: every request resolves again and the fake shuffles the record order.
    fake_dns.set(NAME, "A", ["127.0.0.1", "127.0.0.2", "127.0.0.3"], ttl=0)
    gate = gate_with(pair.port, ["127.0.0.2/32"], min_ttl=0)
    for _ in range(4):
        assert _fetch(gate, scheme, pair.port, test_ca) == [200]
    assert pair.canary.accepted == 0
    assert pair.upstream.accepted == 4
    assert {d.address for d in _destination_decisions(gate)} == {"127.0.0.2"}


def test_aaaa_only_name_connects_over_ipv6(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair6: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    fake_dns.set(NAME, "A", [])  # NODATA: the name has only AAAA records
    fake_dns.set(NAME, "AAAA", ["::1", "::ffff:127.0.0.1"])  # the mapped one is the canary
    gate = gate_with(pair6.port, ["::1/128"])
    assert _fetch(gate, scheme, pair6.port, test_ca) == [200]
    assert pair6.upstream.accepted == 1
    assert pair6.canary.accepted == 0
    (decision,) = _destination_decisions(gate)
    assert decision.address == "::1"


# --- names that resolve to internal addresses ----------------------------------------------------

INTERNAL_ANSWERS = {
    "loopback": {"A": ["127.0.0.1"]},
    "loopbacks": {"A": ["127.0.0.1", "127.0.0.3"]},
    "metadata": {"A": ["169.254.169.254"]},
    "mapped": {"AAAA": ["::ffff:127.0.0.1"]},
    "v6-loopback": {"AAAA": ["::1"]},
    "nat64": {"AAAA": ["64:ff9b::7f00:1"]},
    "nat64-of-opened": {"AAAA": ["64:ff9b::7f00:2"]},  # 127.0.0.2 is open; its NAT64 form is not
    "6to4": {"AAAA": ["2002:7f00:1::1"]},
    "6to4-of-opened": {"AAAA": ["2002:7f00:2::1"]},
    "both-families": {"A": ["127.0.0.1"], "AAAA": ["::1", "64:ff9b::a9fe:a9fe"]},
}


@pytest.mark.parametrize("case", sorted(INTERNAL_ANSWERS))
def test_name_resolving_to_internal_is_refused_with_zero_connections(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
    case: str,
) -> None:
    for rdtype, values in INTERNAL_ANSWERS[case].items():
        fake_dns.set(NAME, rdtype, values)
    gate = gate_with(pair.port, ["127.0.0.2/32"])  # only the upstream's address is open
    assert _fetch(gate, scheme, pair.port, test_ca) == [403]
    assert pair.untouched()
    (decision,) = _destination_decisions(gate)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.INTERNAL_ADDRESS)
    answers = [a for values in INTERNAL_ANSWERS[case].values() for a in values]
    assert decision.address in answers
    assert decision.detail is not None and decision.address in decision.detail


def test_cname_chain_into_internal_is_refused(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    fake_dns.set(NAME, "CNAME", ["edge.cdn.test."])
    fake_dns.set("edge.cdn.test", "CNAME", ["inside.corp.test."])
    fake_dns.set("inside.corp.test", "A", ["127.0.0.1"])
    gate = gate_with(pair.port, ["127.0.0.2/32"])
    _fetch(gate, scheme, pair.port, test_ca)
    assert pair.untouched()
    (decision,) = _destination_decisions(gate)
    assert (decision.reason, decision.address) == (Reason.INTERNAL_ADDRESS, "127.0.0.1")


@pytest.mark.parametrize("failure", ["servfail", "timeout", "nxdomain"])
def test_dns_failure_is_refused_never_allowed(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
    failure: str,
) -> None:
    if failure != "nxdomain":
        getattr(fake_dns, failure)(NAME)
    gate = gate_with(pair.port, ["127.0.0.0/8"], timeout=0.5)  # even with loopback open
    _fetch(gate, scheme, pair.port, test_ca)
    assert pair.untouched()
    (decision,) = _destination_decisions(gate)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.DNS_FAILURE)
    assert fake_dns.count(NAME) >= 1


def test_refusal_reaches_curl_as_403(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    fake_dns.set(NAME, "A", ["127.0.0.1"])
    gate = gate_with(pair.port, ["127.0.0.2/32"])
    result = curl(f"{scheme}://{NAME}:{pair.port}/", gate.url, cacert=test_ca.ca_path)
    if scheme == "http":
        assert result.status == 403
        assert result.headers["x-egress-reason"] == "internal-address"
    else:
        assert result.returncode != 0
        assert "403" in result.stderr or result.status == 403
    assert pair.untouched()


# --- rebinding -----------------------------------------------------------------------------------


def test_rebinding_between_connections_is_refused(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    pair: Pair,
    scheme: str,
    test_ca: LocalCA,
) -> None:
    fake_dns.set_sequence(NAME, "A", [["127.0.0.2"], ["127.0.0.1"]], ttl=0)
    fake_dns.set(NAME, "AAAA", [])
    gate = gate_with(pair.port, ["127.0.0.2/32"], min_ttl=0)
    assert _fetch(gate, scheme, pair.port, test_ca) == [200]
    # checked once, connected to the checked address: nothing resolved the name a second time
    assert fake_dns.queries.count((NAME, "A", "udp")) == 1
    assert pair.upstream.accepted == 1
    _fetch(gate, scheme, pair.port, test_ca)  # the name now rebinds to 127.0.0.1
    assert pair.canary.accepted == 0
    assert pair.upstream.accepted == 1
    first, second = _destination_decisions(gate)
    assert (first.decision, first.address) == (Verdict.ALLOW, "127.0.0.2")
    assert (second.decision, second.reason, second.address) == (
        Verdict.DENY,
        Reason.INTERNAL_ADDRESS,
        "127.0.0.1",
    )


def test_rebinding_inside_a_keepalive_connection_is_refused(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    test_ca: LocalCA,
) -> None:
    p = _pair("http-upstream", "127.0.0.2", "127.0.0.1", None)
    try:
        fake_dns.set_sequence(NAME, "A", [["127.0.0.2"], ["127.0.0.1"]], ttl=0)
        fake_dns.set(NAME, "AAAA", [])
        gate = gate_with(p.port, ["127.0.0.2/32"], min_ttl=0)
        statuses = _fetch(gate, "http", p.port, test_ca, "second", "third")
        assert statuses == [200, 403, 403]
        assert p.canary.accepted == 0
        assert p.upstream.accepted == 1
        assert len(p.upstream.requests) == 1
    finally:
        p.upstream.stop()
        p.canary.stop()


# --- IP literals ---------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "0x7F.0.0.1",
    "0x7f.1",
    "0177.0.0.1",
    "0177.0.0.01",
    "017700000001",
    "127.000.000.001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
]
METADATA_SPELLINGS = [
    "169.254.169.254",
    "2852039166",
    "0xa9fea9fe",
    "0xA9.0xFE.0xA9.0xFE",
    "0251.0376.0251.0376",
    "0251.254.43518",
    "169.254.43518",
    "169.16689662",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",
    "[2002:a9fe:a9fe::]",
    "[fd00:ec2::254]",
]


def _raw(gate: RunningGate, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
        sock.sendall(request)
        head = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    return head


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary("127.0.0.1", 0)
    yield c
    c.stop()


@pytest.mark.parametrize("form", ["connect", "absolute"])
@pytest.mark.parametrize("literal", LOOPBACK_SPELLINGS + METADATA_SPELLINGS)
def test_internal_literal_is_refused_with_zero_connections(
    gate_with: Callable[..., RunningGate],
    fake_dns: FakeDns,
    canary: Canary,
    form: str,
    literal: str,
) -> None:
    port = canary.sock.getsockname()[1]
    gate = gate_with(port)  # a cidrs rule allows these ranges; nothing opens them
    authority = f"{literal}:{port}"
    if form == "connect":
        request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    else:
        request = f"GET http://{authority}/latest/meta-data/ HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    head = _raw(gate, request.encode())
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"X-Egress-Reason: internal-address" in head
    assert canary.accepted == 0
    assert fake_dns.queries == []  # a literal is checked, never resolved
    (decision,) = _destination_decisions(gate)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.INTERNAL_ADDRESS)
    assert decision.address is not None
    if literal in METADATA_SPELLINGS[:8]:
        assert decision.address == "169.254.169.254"
    if literal in LOOPBACK_SPELLINGS[:-2]:
        assert decision.address == "127.0.0.1"


@pytest.mark.parametrize("literal", ["127.0.0.2", "127.2", "2130706434", "[::ffff:127.0.0.2]"])
def test_opened_literal_connects_to_exactly_that_address(
    gate_with: Callable[..., RunningGate], fake_dns: FakeDns, literal: str
) -> None:
    p = _pair("http-upstream", "127.0.0.2", "127.0.0.1", None)
    try:
        gate = gate_with(p.port, ["127.0.0.2/32"])
        result = curl(f"http://{literal}:{p.port}/", gate.url)
        assert result.status == 200, result.stderr
        assert p.upstream.accepted == 1
        assert p.canary.accepted == 0
        assert fake_dns.queries == []
        (decision,) = _destination_decisions(gate)
        assert decision.address == "127.0.0.2"
    finally:
        p.upstream.stop()
        p.canary.stop()


def test_curl_literal_spellings_are_refused(
    gate_with: Callable[..., RunningGate], canary: Canary, test_ca: LocalCA
) -> None:
    port = canary.sock.getsockname()[1]
    gate = gate_with(port)
    for literal in ["127.1", "2130706433", "[::ffff:127.0.0.1]", "169.254.169.254"]:
        http = curl(f"http://{literal}:{port}/", gate.url)
        assert http.status == 403
        assert http.headers["x-egress-reason"] == "internal-address"
        https = curl(f"https://{literal}:{port}/", gate.url, cacert=test_ca.ca_path)
        assert https.returncode != 0
    assert canary.accepted == 0
    assert all(d.reason is Reason.INTERNAL_ADDRESS for d in _destination_decisions(gate))
