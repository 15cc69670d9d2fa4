"""A bounded fuzzer for the DNS gate: valid queries of every type and class, and mutated packets, fed to
the real :class:`proxy.destinations.dnsgate.DnsGate` in-process (thousands a second).

Oracle: the counting upstream sees no question but the allowed name's A/AAAA; the gate never raises;
what it answers is a well-formed DNS message (or nothing); every recorded allow names the allowed host.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rdataclass

from proxy.core.decision import Verdict
from proxy.destinations.dnsgate import DnsGate
from tests.dnsfake import FakeDns

ALLOWED = "allowed.test"
NAMES = [
    ALLOWED,
    "ALLOWED.test.",
    "evil.test",
    "sub.allowed.test",
    "data-0123456789abcdef.evil.test",
    "allowed.test.evil.test",
    "xn--e1afmkfd.test",
    "\\000.allowed.test",
    "a" * 63 + ".test",
    "127.0.0.1",
    ".",
]
TYPES = ["A", "AAAA", "TXT", "ANY", "MX", "CNAME", "HTTPS", "SVCB", "NULL", "AXFR", "PTR", "SRV"]


@dataclass
class Report:
    cases: int = 0
    errors: list[str] = field(default_factory=list)


def valid_query(rng: random.Random) -> bytes:
    name = rng.choice(NAMES)
    try:
        query = dns.message.make_query(
            name,
            rng.choice(TYPES),
            rdclass=rng.choice([dns.rdataclass.IN, dns.rdataclass.IN, dns.rdataclass.CH]),
            use_edns=rng.choice([None, 0]),
        )
    except (dns.exception.DNSException, ValueError):
        query = dns.message.make_query(ALLOWED, "A")
    return query.to_wire()


def mutate(rng: random.Random, wire: bytes) -> bytes:
    out = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        choice = rng.randrange(5)
        if choice == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif choice == 1:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
        elif choice == 2 and out:
            del out[pos : pos + rng.randint(1, 8)]
        elif choice == 3 and len(out) > 4:
            out[2] = rng.randrange(256)  # flags: QR, opcode, ...
        else:
            out[pos:pos] = b"\xc0\x0c"  # a compression pointer, often a loop
    return bytes(out)


async def run(
    gate: DnsGate, upstream: FakeDns, rng: random.Random, *, seconds: float, max_cases: int
) -> Report:
    report = Report()
    deadline = time.monotonic() + seconds
    while report.cases < max_cases and time.monotonic() < deadline:
        wire = valid_query(rng)
        if rng.random() < 0.7:
            wire = mutate(rng, wire)
        transport = rng.choice(["udp", "tcp"])
        try:
            answer = await gate.handle(wire, "127.0.0.1:5353", transport)
        except Exception as exc:  # the oracle: handle never raises
            report.errors.append(f"handle raised {type(exc).__name__}: {exc} on {wire!r}")
            return report
        report.cases += 1
        if answer is not None:
            try:
                dns.message.from_wire(answer)
            except dns.exception.DNSException as exc:
                report.errors.append(f"malformed answer ({exc}) to {wire!r}")
                return report
        leaked = [
            q for q in upstream.queries if q[0].rstrip(".") != ALLOWED or q[1] not in ("A", "AAAA")
        ]
        if leaked:
            report.errors.append(f"upstream saw {leaked[:3]} after {wire!r}")
            return report
    return report


def wrongly_allowed(gate_decisions: list[object]) -> list[str]:
    bad = []
    for decision in gate_decisions:
        verdict = getattr(decision, "decision", None)
        if verdict is not Verdict.DENY and getattr(decision, "host", None) != ALLOWED:
            bad.append(f"allowed DNS {getattr(decision, 'host', '?')!r}")
    return bad


__all__ = ["ALLOWED", "Report", "mutate", "run", "valid_query", "wrongly_allowed"]
