"""The doctor's probe, outside a sandbox: each observation it reports, against real loopback servers.

Inside the sandbox it is exercised end to end by ``test_doctor.py::test_doctor_passes_on_this_machine``;
here every way it can read a result is checked on its own, so a wrong reading cannot hide there as a
false "ok".
"""

from __future__ import annotations

import ast
import json
import shutil
import socket
import subprocess
import sys

import dns.message
import dns.rcode
import dns.rrset
import pytest

from proxy.sandbox import probe
from proxy.sandbox.doctor import PROBE
from tests.dnsfake import FakeDns
from tests.harness import WAIT, Canary, LoopbackServer, closed_port, recv_head


class ClosingHttp(LoopbackServer):
    """Answers one request with 200 and ``body``, then closes, as the gate does for the probe's
    ``Connection: close`` requests."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.heads: list[bytes] = []
        super().__init__(name="closing-http")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        self.heads.append(recv_head(conn))
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(self.body), self.body)
        )


def test_the_probe_needs_only_the_standard_library() -> None:
    """It runs with ``python -I`` in a sandbox that must not need this package's dependencies."""
    tree = ast.parse(PROBE.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names, "no imports found: the check would pass vacuously"
    assert {n.split(".")[0] for n in names} - {"__future__"} <= sys.stdlib_module_names


def test_tcp_tells_connected_from_refused() -> None:
    canary = Canary()
    try:
        assert probe.tcp(socket.AF_INET, ("127.0.0.1", canary.port)) == "connected"
        assert probe.tcp(socket.AF_INET, ("127.0.0.1", closed_port())) == "ECONNREFUSED"
    finally:
        canary.stop()


def test_udp_out_reports_sent() -> None:
    assert probe.udp_out(("127.0.0.1", closed_port(socket.SOCK_DGRAM))) == "sent"


def test_errname() -> None:
    assert probe.errname(TimeoutError()) == "timeout"
    assert probe.errname(ConnectionRefusedError(111, "refused")) == "ECONNREFUSED"
    assert probe.errname(OSError()) == "OSError"


def test_the_hand_built_question_is_a_plain_a_query() -> None:
    query = dns.message.from_wire(probe.dns_question("allowed.example.test"))
    (question,) = query.question
    assert question.name.to_text() == "allowed.example.test."
    assert dns.rdatatype.to_text(question.rdtype) == "A"
    assert query.flags & dns.flags.RD


@pytest.mark.parametrize(
    ("rcode", "address", "expected"),
    [
        (dns.rcode.NOERROR, "127.0.0.1", "NOERROR 127.0.0.1"),
        (dns.rcode.NOERROR, None, "NOERROR"),
        (dns.rcode.NXDOMAIN, None, "NXDOMAIN"),
        (dns.rcode.SERVFAIL, None, "SERVFAIL"),
        (dns.rcode.REFUSED, None, "REFUSED"),
        (dns.rcode.NOTIMP, None, "rcode4"),
    ],
)
def test_answers_are_read_by_rcode_and_address(
    rcode: int, address: str | None, expected: str
) -> None:
    query = dns.message.from_wire(probe.dns_question("x.test"))
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if address is not None:
        response.answer.append(dns.rrset.from_text("x.test.", 60, "IN", "A", address))
    assert probe.dns_answer(response.to_wire()) == expected


def test_dns_query_against_a_real_server_and_a_closed_port() -> None:
    with FakeDns() as server:
        server.set("allowed.test", "A", ["127.0.0.1"])
        assert probe.dns_query(server.address, "allowed.test") == "NOERROR 127.0.0.1"
        assert probe.dns_query(server.address, "unknown.test") == "NXDOMAIN"
        assert [q[0] for q in server.queries] == ["allowed.test", "unknown.test"]
    assert probe.dns_query(("127.0.0.1", closed_port(socket.SOCK_DGRAM)), "x.test") == (
        "ECONNREFUSED"
    )


SELF_CONNECT = """
import json, pathlib, socket, sys
ports = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
sys.path.insert(0, sys.argv[1])
import probe
port = 40000  # free here, as the host's canary ports are inside the sandbox
ports.write_text("40000 40000")  # the kernel's only local port is the destination's
alone = probe.tcp(socket.AF_INET, ("127.0.0.1", port))
ports.write_text("40000 40001")
print(json.dumps({
    "alone": alone,
    "tcp": sorted({probe.tcp(socket.AF_INET, ("127.0.0.1", port)) for _ in range(20)}),
    "udp": sorted({probe.dns_query(("127.0.0.1", port), "x.test") for _ in range(20)}),
}))
"""


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_free_port_never_answers_through_a_self_connection() -> None:
    """A socket whose local port the kernel picks equal to its destination's connects to itself on
    loopback: TCP's simultaneous open reads ``connected`` and UDP's echoed question ``NOERROR``,
    as if a host service answered. In a network namespace of the test's own, with the kernel's
    local ports narrowed to the destination's alone (a plain connect then always reaches itself),
    then to two (UDP's pick lands on the destination's about every other try), the probe must
    never read an answer: with no other port it says so, with one it reads refused."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    command = ["sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    command += [sys.executable, "-I", "-c", SELF_CONNECT, str(PROBE.parent)]
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=WAIT)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "alone": "EADDRINUSE",
        "tcp": ["ECONNREFUSED"],
        "udp": ["ECONNREFUSED"],
    }


def test_http_via_proxy_reads_the_status_and_the_marker() -> None:
    gate = ClosingHttp(b"from marker-upstream")
    try:
        url = "http://allowed.test/"
        assert probe.http_via_proxy(gate.port, url, "marker-upstream") == ("200", True)
        assert probe.http_via_proxy(gate.port, url, "another-marker") == ("200", False)
        assert gate.heads[0].startswith(b"GET http://allowed.test/ HTTP/1.1\r\n")
        assert b"\r\nHost: allowed.test\r\n" in gate.heads[0]
    finally:
        gate.stop()


def test_the_script_reads_targets_on_stdin_and_prints_one_json_object() -> None:
    """Outside a sandbox its observations are the host's; only the shape is checked here."""
    canary, gate = Canary(), ClosingHttp(b"from marker-upstream")
    targets = {
        "proxy_port": gate.port,
        "tcp_canary": canary.port,
        "tcp6_canary": closed_port(),
        "udp_canary": closed_port(socket.SOCK_DGRAM),
        "gate_port": closed_port(),
        "upstream_port": 8080,
        "upstream_name": "allowed.test",
        "refused_name": "refused.test",
        "marker": "marker-upstream",
        "resolvers": [],
    }
    try:
        result = subprocess.run(
            [sys.executable, "-I", str(PROBE)], input=json.dumps(targets) + "\n",
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        canary.stop()
        gate.stop()
    assert result.returncode == 0, result.stderr
    observations = json.loads(result.stdout)
    assert observations["tcp_host_loopback"] == "connected"
    assert observations["tcp_gate_host_port"] == "ECONNREFUSED"
    assert observations["proxy_allowed"] == ["200", True]
    assert [h.split(b" ")[1] for h in gate.heads] == [
        b"http://allowed.test:8080/",
        b"http://refused.test:8080/",
    ]
    assert observations["outside_resolvers"] == {}
    assert set(observations) >= {"interfaces", "routes4", "routes6", "caps", "resolv_conf"}
