"""Threat class 18: a real value a service kept, shown back on another port of the bound host.

A service may keep a header it was sent (a request log, a "last delivery" page) and show it later;
responses from a bound host are scrubbed for that reason, whether or not their request carried the
credential. The credential is bound to one port, but the service often answers on others too: its
plain-HTTP port, a second TLS port. Those responses are scrubbed as well. Each upstream here answers
as such a service would: the real token in a header and in the body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.credentials_harness import (
    GITHUB_TOKEN,
    credential_store,
    curl_through,
    gate_with_credentials,
)
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import LocalCA, RunningGate, Upstream, serving

pytestmark = pytest.mark.timeout(120)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: api
    hosts: [allowed.test, other.test]
    ports: [{bound}, {second}]
    inspect: true
  - name: plain
    hosts: [allowed.test, other.test]
    ports: [{plain}]
  - name: sockets
    hosts: [allowed.test, other.test]
    ports: [{second}, {plain}]
    methods: [GET]
    paths: [/socket]
    websocket: true
"""


class Kept(Upstream):
    """A service showing the Authorization header it kept from an earlier request."""

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        payload = f"last delivery: authorization=Bearer {GITHUB_TOKEN}\n".encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            + f"X-Last: Bearer {GITHUB_TOKEN}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test", "other.test")


@pytest.fixture(scope="module")
def bound(test_ca: LocalCA) -> Iterator[Kept]:
    yield from serving(Kept("bound", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def second(test_ca: LocalCA) -> Iterator[Kept]:
    yield from serving(Kept("second", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def plain() -> Iterator[Kept]:
    yield from serving(Kept("plain"))


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    bound: Kept,
    second: Kept,
    plain: Kept,
    test_ca: LocalCA,
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("scrub-ports")
    policy = POLICY.format(bound=bound.port, second=second.port, plain=plain.port)
    (directory / "p.yaml").write_text(policy)
    store = credential_store(
        directory,
        [
            {
                "name": "github",
                "source": {"env": "EGRESS_SCRUB_PORTS_TOKEN"},
                "hosts": [f"allowed.test:{bound.port}"],
                "header": "Authorization",
            }
        ],
        {"EGRESS_SCRUB_PORTS_TOKEN": GITHUB_TOKEN},
    )
    store.issue(None)
    running = gate_with_credentials(directory, policy, dns.nameserver, test_ca, store)
    yield running
    running.stop()


def _fetch(gate: RunningGate, url: str) -> str:
    result = curl_through(gate, url)
    assert result.status == 200, result
    return result.body + json.dumps(result.headers)


@pytest.mark.parametrize("where", ["bound", "second", "plain"])
def test_a_kept_value_never_comes_back_from_any_port_of_the_bound_host(
    gate: RunningGate, bound: Kept, second: Kept, plain: Kept, where: str
) -> None:
    upstream = {"bound": bound, "second": second, "plain": plain}[where]
    scheme = "http" if where == "plain" else "https"
    seen = _fetch(gate, f"{scheme}://allowed.test:{upstream.port}/deliveries/last")
    assert "last delivery" in seen  # the service answered
    assert GITHUB_TOKEN not in seen, seen


def test_another_host_is_not_scrubbed(gate: RunningGate, second: Kept) -> None:
    """Control: scrubbing follows the bound host name; another host's answer passes as sent."""
    assert GITHUB_TOKEN in _fetch(gate, f"https://other.test:{second.port}/")


UPGRADE = (
    "--http1.1", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
    "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-H", "Sec-WebSocket-Version: 13",
)  # fmt: skip


@pytest.mark.parametrize("where", ["second", "plain"])
def test_no_websocket_to_any_port_of_the_bound_host(
    gate: RunningGate, second: Kept, plain: Kept, where: str
) -> None:
    """What comes back over an upgrade is not read, so it could bring a kept value back
    unscrubbed: refused on every port of the bound host, whatever ``websocket: true`` says. The
    control: another host's upgrade reaches its upstream (which does not speak WebSocket)."""
    upstream = {"second": second, "plain": plain}[where]
    scheme = "http" if where == "plain" else "https"
    before = len(upstream.requests)
    result = curl_through(gate, f"{scheme}://allowed.test:{upstream.port}/socket", *UPGRADE)
    assert result.status == 403, result
    assert result.headers["x-egress-reason"] == "credential-misuse"
    assert len(upstream.requests) == before  # nothing arrived
    control = curl_through(gate, f"{scheme}://other.test:{upstream.port}/socket", *UPGRADE)
    assert control.status != 403, control
    assert len(upstream.requests) == before + 1
