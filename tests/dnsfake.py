"""A hermetic, programmable DNS server for tests: loopback only, UDP and TCP on one port, counts queries.

Tests prove that a refusal leaked nothing by asserting on :attr:`FakeDns.queries`, so every query that
reaches this server is recorded before it is answered (or deliberately left unanswered). It behaves like
a recursive resolver seen from a stub: CNAME chains are followed and answered in one response, unknown
names are NXDOMAIN, known names without the asked type are NODATA (NOERROR, empty answer).

    with FakeDns() as dns_server:
        dns_server.set("pypi.test", "A", ["203.0.113.10"])
        dns_server.set_sequence("rebind.test", "A", [["203.0.113.10"], ["127.0.0.1"]], ttl=0)
        host, port = dns_server.address
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["FakeDns"]

_MAX_CHAIN = 10  # CNAME hops followed before answering with what we have (loops end here too)
_TCP_IDLE = 5.0  # seconds a test client may keep a TCP connection idle before it is closed


@dataclass
class _Entry:
    answers: list[list[str]]
    ttl: int
    served: int = 0

    def next_values(self) -> list[str]:
        """Successive queries walk the sequence and then stay on its last answer."""
        values = self.answers[min(self.served, len(self.answers) - 1)]
        self.served += 1
        return values


def _name(name: str | dns.name.Name) -> dns.name.Name:
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name)


def _rdtype(rdtype: str | dns.rdatatype.RdataType) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(rdtype)


class FakeDns:
    """A DNS server on ``127.0.0.1`` (UDP and TCP on the same ephemeral port) that tests program."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port  # 0: ephemeral; a fixed one lets a test restart "the same" server
        self._garbage = False
        self._lock = threading.Lock()
        self._records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], _Entry] = {}
        self._servfail: set[dns.name.Name] = set()
        self._timeout: set[dns.name.Name] = set()
        self._queries: list[tuple[str, str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    # --- programming -----------------------------------------------------------------------------

    def set(
        self,
        name: str,
        rdtype: str | dns.rdatatype.RdataType,
        values: Sequence[str],
        ttl: int = 60,
    ) -> None:
        """Answer ``name``/``rdtype`` with ``values`` (rdata text; TXT values are quoted for you).
        An empty ``values`` makes the name exist without that type (NODATA)."""
        self.set_sequence(name, rdtype, [list(values)], ttl=ttl)

    def set_sequence(
        self,
        name: str,
        rdtype: str | dns.rdatatype.RdataType,
        answers: Sequence[Sequence[str]],
        ttl: int = 0,
    ) -> None:
        """Successive queries get successive answers (the last one repeats): DNS rebinding."""
        if not answers:
            raise ValueError("set_sequence needs at least one answer")
        with self._lock:
            self._records[(_name(name), _rdtype(rdtype))] = _Entry([list(a) for a in answers], ttl)

    def loopback(self, *names: str) -> None:
        """Answer each of ``names`` with 127.0.0.1 (A): the usual test upstream on this host."""
        for name in names:
            self.set(name, "A", ["127.0.0.1"])

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_name(name))

    def garbage(self, on: bool = True) -> None:
        """Answer every query with bytes that are not its answer (a broken or hostile upstream):
        malformed packets, another query's id, a response to another question."""
        self._garbage = on

    def timeout(self, name: str) -> None:
        """Never answer queries for ``name`` (they are still counted)."""
        with self._lock:
            self._timeout.add(_name(name))

    # --- observation -----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("FakeDns is not started")
        host, port = self._udp.getsockname()[:2]
        return host, port

    @property
    def nameserver(self) -> str:
        """The ``ip:port`` form resolvers in this project accept."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def queries(self) -> list[tuple[str, str, str]]:
        """Every query received so far as ``(qname, qtype, transport)``; qname lower-case, no final dot."""
        with self._lock:
            return list(self._queries)

    def count(self, name: str | None = None) -> int:
        wanted = None if name is None else name.lower().rstrip(".")
        return sum(1 for q in self.queries if wanted is None or q[0] == wanted)

    def reset_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeDns:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # TCP must share the UDP port (truncation fallback): a kernel-chosen port is chosen again
        # when its TCP side is taken; a port asked for is tried once (EADDRINUSE when taken).
        for _ in range(50 if self._port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((self._host, self._port))
            except OSError:
                udp.close()
                raise
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self._host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            self._udp, self._tcp = udp, tcp
            break
        else:
            raise OSError(errno.EADDRINUSE, "could not bind UDP and TCP on one port")
        thread = threading.Thread(target=self._serve, name="fakedns", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> FakeDns:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- serving ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    if key.data == "udp":
                        self._serve_udp()
                    else:
                        conn, _peer = self._tcp.accept()
                        worker = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
                        with self._lock:
                            self._conns.add(conn)
                        self._threads.append(worker)
                        worker.start()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self._reply(wire, "udp")
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(_TCP_IDLE)
        try:
            while not self._stop.is_set():
                header = _recv_exactly(conn, 2)
                if header is None:
                    return
                wire = _recv_exactly(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                reply = self._reply(wire, "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _reply(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if len(query.question) != 1:
            return None
        question = query.question[0]
        with self._lock:
            self._queries.append(
                (
                    question.name.to_text(omit_final_dot=True).lower(),
                    dns.rdatatype.to_text(question.rdtype),
                    transport,
                )
            )
            if question.name in self._timeout:
                return None
            if self._garbage:
                return _garbage(query, len(self._queries))
            response = dns.message.make_response(query, recursion_available=True)
            if question.name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                self._answer(response, question.name, question.rdtype)
        max_size = 65535 if transport == "tcp" else max(query.payload, 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _answer(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        """Follow CNAMEs like a recursive resolver; must hold the lock."""
        for _ in range(_MAX_CHAIN):
            entry = self._records.get((name, rdtype))
            if entry is not None:
                values = entry.next_values()
                if values:  # an empty answer is NODATA: the name exists, the type does not
                    response.answer.append(_rrset(name, rdtype, values, entry.ttl))
                return
            cname = self._records.get((name, dns.rdatatype.CNAME))
            if cname is None or rdtype == dns.rdatatype.CNAME:
                if not any(key[0] == name for key in self._records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            values = cname.next_values()
            if not values:
                return
            response.answer.append(_rrset(name, dns.rdatatype.CNAME, values, cname.ttl))
            name = dns.name.from_text(values[0])
            if name in self._servfail:
                response.answer.clear()
                response.set_rcode(dns.rcode.SERVFAIL)
                return


def _rrset(
    name: dns.name.Name, rdtype: dns.rdatatype.RdataType, values: list[str], ttl: int
) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
    for value in values:
        text = value
        if rdtype == dns.rdatatype.TXT and not value.startswith('"'):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text), ttl)
    return rrset


def _garbage(query: dns.message.Message, n: int) -> bytes:
    """The n-th of a few kinds of wrong answer to ``query``."""
    kind = n % 4
    if kind == 0:
        return bytes((query.id >> 8, query.id & 0xFF)) + b"\x81\x80\xff\xff" + b"\x00" * 7
    if kind == 1:
        wrong = dns.message.make_response(query)
        wrong.id = (query.id + 1) & 0xFFFF
        return wrong.to_wire()
    if kind == 2:
        other = dns.message.make_response(dns.message.make_query("other.test", "A"))
        other.id = query.id
        return other.to_wire()
    return b"\x00"


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def loopback_dns(*names: str) -> Iterator[FakeDns]:
    """A running FakeDns answering ``names`` with 127.0.0.1, as a pytest fixture body:
    ``yield from loopback_dns("allowed.test", ...)``."""
    with FakeDns() as server:
        server.loopback(*names)
        yield server
