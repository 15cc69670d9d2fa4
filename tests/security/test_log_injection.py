"""Threat class 15: hostile strings must not forge audit records or refusal text.

Everything a client controls and a decision records (method, path, Host header, SNI) is sent with
quotes, newlines, JSON fragments and terminal control sequences. The decision log
(:class:`proxy.evidence.emit.JsonLineSink`) must keep exactly one JSON object per decision with the hostile value
intact but escaped; the 403 an agent (and a human reading its transcript) sees must not carry raw
control characters or extra lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.evidence.emit import JsonLineSink
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import RunningGate, Upstream
from tests.security import client_hello, exchange, fresh_decisions, parse_responses, start_gate_with

pytestmark = pytest.mark.timeout(60)

FORGED = '"}\n{"event":"egress.decision","decision":"allow","host":"evil.test"}'


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test")


@pytest.fixture(scope="module")
def logged(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, tls: Upstream
) -> Iterator[tuple[RunningGate, Path]]:
    directory = tmp_path_factory.mktemp("log-injection")
    log = directory / "decisions.jsonl"
    sink = JsonLineSink(path=str(log))
    gate = start_gate_with(
        directory,
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: allowed
            hosts: [allowed.test]
            ports: [{tls.port}, 80]
        """,
        dns.nameserver,
        sinks=[sink],
    )
    yield gate, log
    gate.stop()
    sink.close()


# (raw request bytes, the field and the exact value the decision must record)
HOSTILE_REQUESTS = [
    (
        b"G\x1b[31mET http://evil.test/a HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        "method",
        "G\x1b[31MET",
    ),
    (b"GET http://evil.test/a\x00b HTTP/1.1\r\nHost: evil.test\r\n\r\n", "path", "/a\x00b"),
    (
        b'GET http://evil.test/x"},{"decision":"allow HTTP/1.1\r\nHost: evil.test\r\n\r\n',
        "path",
        '/x"},{"decision":"allow',
    ),
    (b"GET http://evil.test/a\x7fb HTTP/1.1\r\nHost: evil.test\r\n\r\n", "path", "/a\x7fb"),
]

HOSTILE_HOST_HEADERS = [
    b'allowed.test"\x1b[2J',
    b"evil\rX-Forged: 1",
    FORGED.replace("\n", "\t").encode(),
    b"\xe2\x80\xaeevil.test",
]


def _lines(log: Path) -> list[str]:
    return log.read_text(encoding="utf-8").splitlines()


def _decision_lines(log: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in _lines(log)]
    return [r for r in records if r.get("event") == "egress.decision"]


def _assert_log_intact(gate: RunningGate, log: Path) -> None:
    """One printable-ASCII JSON object per line, one decision line per recorded decision."""
    lines = _lines(log)
    for line in lines:
        assert line.isascii() and line.isprintable(), line
        json.loads(line)
    assert len(_decision_lines(log)) == len(gate.decisions)


@pytest.mark.parametrize(("raw", "key", "value"), HOSTILE_REQUESTS, ids=lambda v: repr(v)[:20])
def test_hostile_method_and_path_stay_one_escaped_log_line(
    logged: tuple[RunningGate, Path], raw: bytes, key: str, value: str
) -> None:
    gate, log = logged
    before = len(gate.decisions)
    reply = exchange(gate, raw)
    assert reply.status in (400, 403)  # a request line outside the grammar is refused first
    (decision,) = fresh_decisions(gate, before)
    assert getattr(decision, key) == value
    _assert_log_intact(gate, log)
    record = next(r for r in _decision_lines(log) if r["id"] == decision.id)
    assert record[key] == value  # kept intact, only escaped
    assert record["decision"] == "deny"


@pytest.mark.parametrize("header", HOSTILE_HOST_HEADERS, ids=lambda v: repr(v)[:20])
def test_hostile_host_header_is_refused_without_echo(
    logged: tuple[RunningGate, Path], tls: Upstream, header: bytes
) -> None:
    gate, log = logged
    before = len(gate.decisions)
    reply = exchange(gate, b"GET http://allowed.test/ HTTP/1.1\r\nHost: " + header + b"\r\n\r\n")
    assert reply.status in (400, 403)
    for decision in fresh_decisions(gate, before):
        assert not decision.allowed
        assert (decision.detail or "").isprintable()
    _assert_log_intact(gate, log)
    (_, head, body) = parse_responses(reply.data)[-1]
    assert b"\x1b" not in reply.data and b"\xe2\x80\xae" not in body
    assert b"X-Forged" not in head


@pytest.mark.parametrize("sni", ["allowed.test\n", "allowed.test\t", "evil.test"])
def test_hostile_sni_stays_one_escaped_log_line(
    logged: tuple[RunningGate, Path], tls: Upstream, sni: str
) -> None:
    """mitmproxy's host check accepts a label ending in a newline (its regex uses ``$``); the gate
    must refuse it and record it escaped. Python's ssl will not send such a name, so the bytes are
    patched into a real ClientHello of the same length."""
    gate, log = logged
    stand_in = "a" * len(sni)
    hello = client_hello(stand_in).replace(stand_in.encode(), sni.encode())
    before = len(gate.decisions)
    reply = exchange(gate, f"CONNECT allowed.test:{tls.port} HTTP/1.1\r\n\r\n".encode(), hello)
    assert reply.closed
    assert tls.accepted == 0
    _, verdict = fresh_decisions(gate, before)
    assert not verdict.allowed
    assert verdict.sni in (sni, None)  # recorded exactly, or not at all when mitmproxy dropped it
    assert (verdict.detail or "").isprintable()
    _assert_log_intact(gate, log)


BENIGN = {
    403: b"GET http://evil.test/a HTTP/1.1\r\nHost: evil.test\r\n\r\n",  # no rule for the host
    400: b"GET http://evil.test//a HTTP/1.1\r\nHost: evil.test\r\n\r\n",  # outside the grammar
}


def _benign_refusal_line_count(gate: RunningGate, status: int) -> int:
    """Lines of a refusal for the same reason whose request holds nothing hostile."""
    reply = exchange(gate, BENIGN[status])
    assert reply.status == status
    return reply.data.split(b"\r\n\r\n", 1)[1].count(b"\n")


@pytest.mark.parametrize(("raw", "key", "value"), HOSTILE_REQUESTS, ids=lambda v: repr(v)[:20])
def test_refusal_text_never_gains_lines_and_headers_stay_printable(
    logged: tuple[RunningGate, Path], raw: bytes, key: str, value: str
) -> None:
    gate, _ = logged
    reply = exchange(gate, raw)
    ((status, head, body),) = parse_responses(reply.data)
    assert status in (400, 403)
    assert body.count(b"\n") == _benign_refusal_line_count(gate, status) and b"\r" not in body
    assert all(0x20 <= b < 0x7F for b in head.replace(b"\r\n", b""))


@pytest.mark.parametrize(
    "raw",
    [r for r, _, _ in HOSTILE_REQUESTS if r != HOSTILE_REQUESTS[2][0]],
    ids=["esc", "nul", "del"],
)
def test_refusal_text_carries_no_control_characters(
    logged: tuple[RunningGate, Path], raw: bytes
) -> None:
    gate, _ = logged
    ((status, _, body),) = parse_responses(exchange(gate, raw).data)
    assert status in (400, 403)
    text = body.decode("utf-8")
    assert all(ch == "\n" or ch.isprintable() for ch in text), repr(text)
