"""A bounded fuzzer for the gate's front door: request lines, headers, CONNECT targets and ClientHellos,
random and mutated from valid seeds, sent to a real gate on loopback.

The oracle is the same as every security test's: nothing the policy does not allow is ever reached. A
canary listener (a port no rule allows, on an address the policy's ``allow_internal`` opens) must accept
zero connections; the counting DNS server must see no name but the allowed one; every recorded allow
must name the allowed host on an allowed port. Between batches a control tunnel must still work, so a
crash or a hang of the gate fails the run too. Everything is driven by one ``random.Random``: a seed
replays a run exactly (modulo timing).
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from proxy.core.decision import Decision, Verdict
from tests.harness import client_hello, recv_head

ALLOWED = "allowed.test"
HOSTILE_HOSTS = [
    "evil.test",
    "sub.allowed.test",
    "allowed.test.evil.test",
    "evilallowed.test",
    "allowed.test@evil.test",
    "evil.test#allowed.test",
    "allowed.test%00.evil.test",
    "evil.test\x00allowed.test",
    "allowed.test\r\nHost: evil.test",
    "127.0.0.1",
    "2130706433",
    "0x7f.1",
    "127.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
    "ALLOWED.TEST.",
    "xn--llowed-bxa.test",
    "allowed.test:443:80",
    "",
    "a" * 300,
    "allowed.test" + "." * 5,
]


@dataclass
class Target:
    """What the fuzzer may and may not reach."""

    gate_port: int
    allowed_ports: tuple[int, ...]
    canary_port: int


@dataclass
class Report:
    cases: int = 0
    control_checks: int = 0
    errors: list[str] = field(default_factory=list)


def seeds(target: Target) -> list[bytes]:
    tls, plain = target.allowed_ports
    canary = target.canary_port
    hello = client_hello(ALLOWED)
    return [
        f"CONNECT {ALLOWED}:{tls} HTTP/1.1\r\nHost: {ALLOWED}:{tls}\r\n\r\n".encode() + hello,
        f"GET http://{ALLOWED}:{plain}/x?y=1 HTTP/1.1\r\nHost: {ALLOWED}:{plain}\r\n\r\n".encode(),
        f"POST http://{ALLOWED}:{plain}/p HTTP/1.1\r\nHost: {ALLOWED}:{plain}\r\n"
        "Content-Length: 5\r\n\r\nhello".encode(),
        f"POST http://{ALLOWED}:{plain}/c HTTP/1.1\r\nHost: {ALLOWED}:{plain}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
        f"CONNECT evil.test:{canary} HTTP/1.1\r\nHost: evil.test:{canary}\r\n\r\n".encode(),
        f"GET http://127.0.0.1:{canary}/ HTTP/1.1\r\nHost: 127.0.0.1:{canary}\r\n\r\n".encode(),
        f"CONNECT {ALLOWED}:{plain} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: {ALLOWED}:{plain}\r\n\r\n".encode(),
        f"GET http://{ALLOWED}:{plain}/ HTTP/1.1\r\nHost: {ALLOWED}:{plain}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode(),
        f"CONNECT {ALLOWED}:{tls} HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n".encode()
        + client_hello("evil.test"),
        b"\x16\x03\x01\x00\x05hello",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ]


def _host_swap(rng: random.Random, data: bytes, target: Target) -> bytes:
    host = rng.choice(HOSTILE_HOSTS).encode("latin-1")
    port = str(rng.choice([*target.allowed_ports, target.canary_port, 0, 65536, 22])).encode()
    data = data.replace(ALLOWED.encode(), host, rng.randint(1, 3))
    if rng.random() < 0.5:
        for allowed in target.allowed_ports:
            data = data.replace(str(allowed).encode(), port, 1)
    return data


def mutate(rng: random.Random, data: bytes, pool: list[bytes], target: Target) -> bytes:
    """One to four mutations: byte flips, inserts, deletes, duplicated or spliced runs, host and port
    swaps, control characters, long or many headers."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif choice == 1:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 2 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif choice == 3 and out:
            end = min(len(out), pos + rng.randint(1, 64))
            out[pos:pos] = out[pos:end] * rng.randint(1, 4)
        elif choice == 4:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            out = out[:pos] + bytearray(other[cut:])
        elif choice == 5:
            out = bytearray(_host_swap(rng, bytes(out), target))
        elif choice == 6:
            out[pos:pos] = rng.choice(
                [b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b"@", b"%"]
            )
        elif choice == 7:
            header = b"X-F: " + b"a" * rng.choice([10, 1000, 70000]) + b"\r\n"
            idx = out.find(b"\r\n")
            if idx >= 0:
                out[idx + 2 : idx + 2] = header * rng.randint(1, 3)
        else:
            idx = out.find(b"\r\n")
            if idx >= 0:
                out[idx + 2 : idx + 2] = b"".join(
                    f"H{i}: v\r\n".encode() for i in range(rng.choice([5, 200]))
                )
    return bytes(out)


def random_case(rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    method = rng.choice([b"GET", b"CONNECT", b"POST", b"get", b"G\x00T", b"", b"OPTIONS", b"PRI"])
    target = rng.choice(
        [b"*", b"/", b"http://", b"https://evil.test/", b"evil.test:443", b"[", b"::1", b"a:b:c"]
    )
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b"", b"http/1.1"])
    return method + b" " + target + b" " + version + b"\r\n\r\n"


def _send(port: int, data: bytes, wait: float) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(wait)
            try:
                sock.sendall(data)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline:
                    if not sock.recv(65536):
                        break
            except OSError:
                pass
    except OSError:
        pass


def control_tunnel(target: Target) -> str | None:
    """A well-formed, allowed tunnel must still be answered: None if it is, else what went wrong."""
    tls = target.allowed_ports[0]
    try:
        with socket.create_connection(("127.0.0.1", target.gate_port), timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(
                f"CONNECT {ALLOWED}:{tls} HTTP/1.1\r\nHost: {ALLOWED}:{tls}\r\n\r\n".encode()
            )
            head = recv_head(sock)
    except OSError as exc:
        return f"control tunnel failed: {exc}"
    if not head.startswith(b"HTTP/1.1 200"):
        return f"control tunnel answered {head[:60]!r}"
    return None


def run(
    target: Target,
    rng: random.Random,
    *,
    seconds: float,
    max_cases: int,
    leaks: Callable[[], list[str]],
    workers: int = 16,
    batch: int = 256,
    wait: float = 0.15,
) -> Report:
    """Fuzz until ``seconds`` or ``max_cases``; ``leaks`` reports oracle violations seen so far."""
    report = Report()
    pool = seeds(target)
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(workers) as executor:
        while report.cases < max_cases and time.monotonic() < deadline:
            cases = []
            for _ in range(min(batch, max_cases - report.cases)):
                if rng.random() < 0.15:
                    cases.append(random_case(rng))
                else:
                    cases.append(mutate(rng, rng.choice(pool), pool, target))
            list(executor.map(lambda data: _send(target.gate_port, data, wait), cases))
            report.cases += len(cases)
            report.control_checks += 1
            problem = control_tunnel(target)
            if problem is not None:
                report.errors.append(f"after {report.cases} cases: {problem}")
                return report
            found = leaks()
            if found:
                report.errors.extend(found)
                return report
    return report


def wrongly_allowed(decisions: list[Decision], target: Target) -> list[str]:
    """Every allow (and report) must be the allowed host on an allowed port."""
    bad = []
    for decision in decisions:
        if decision.decision is Verdict.DENY:
            continue
        if decision.host != ALLOWED or decision.port not in target.allowed_ports:
            bad.append(
                f"allowed {decision.kind} {decision.host!r}:{decision.port} ({decision.reason})"
            )
    return bad


__all__ = [
    "ALLOWED",
    "Report",
    "Target",
    "control_tunnel",
    "mutate",
    "run",
    "seeds",
    "wrongly_allowed",
]
