"""A real gate, a counting DNS server, allowed upstreams and a canary for the front-door fuzzer."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.core.limits import Limits
from tests.dnsfake import FakeDns
from tests.fuzz.frontdoor import ALLOWED, Target, wrongly_allowed
from tests.harness import Canary, LocalCA, RunningGate, Upstream


@dataclass
class World:
    gate: RunningGate
    dns: FakeDns
    canary: Canary
    target: Target

    def leaks(self) -> list[str]:
        found = []
        if self.canary.accepted:
            found.append(f"the canary accepted {self.canary.accepted} connection(s)")
        names = {q[0].rstrip(".").lower() for q in self.dns.queries}
        if names - {ALLOWED}:
            found.append(f"DNS queries for {sorted(names - {ALLOWED})[:5]}")
        found += wrongly_allowed(self.gate.decisions, self.target)
        return found


def make_world(directory: Path) -> Iterator[World]:
    ca = LocalCA(directory / "ca", [ALLOWED])
    with FakeDns() as dns:
        for name in (ALLOWED, "evil.test", "sub.allowed.test", "localhost"):
            dns.set(name, "A", ["127.0.0.1"])
        tls = Upstream("tls", tls=ca.server_context())
        plain = Upstream("plain")
        canary = Canary()
        policy = directory / "policy.yaml"
        policy.write_text(
            textwrap.dedent(
                f"""
                version: 1
                allow_internal: [127.0.0.0/8]
                rules:
                  - name: allowed
                    hosts: [{ALLOWED}]
                    ports: [{tls.port}, {plain.port}]
                  - name: no-subdomains
                    action: deny
                    hosts: ["*.{ALLOWED}"]
                """
            )
        )
        gate = RunningGate(
            policy,
            [dns.nameserver],
            config={
                "limits": Limits(max_connections_per_client=4096, new_connections_burst=100_000)
            },
        )
        gate.start()
        try:
            yield World(gate, dns, canary, Target(gate.port, (tls.port, plain.port), canary.port))
        finally:
            gate.stop()
            for server in (tls, plain, canary):
                server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from make_world(tmp_path_factory.mktemp("fuzz"))
