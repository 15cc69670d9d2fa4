"""The ``egress doctor`` probe: runs inside the sandbox and tries every way out the threat model names.

Run as a script (``python -I probe.py``), so it imports nothing but the standard library: the sandbox
must not need this package's dependencies, and nothing from the environment may change what it does. It
reads its targets as one JSON line on stdin (written once the gate is up) and prints one JSON object of
observations; ``doctor.evaluate`` judges them.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
from typing import Any

RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def errname(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def apart_from(family: int, kind: int, port: int) -> socket.socket:
    """A socket bound to a local port other than ``port``. Inside the sandbox the host's canary ports
    are free, and a socket the kernel gives the destination's own port connects to itself on
    loopback (TCP's simultaneous open, UDP's echo of the question): read as a host service
    answering. A colliding socket is held while the next binds, so the next gets another port."""
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            s = socket.socket(family, kind)
            try:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            except OSError:
                s.close()
                raise
            if s.getsockname()[1] != port:
                return s
            held.append(s)
        raise OSError(errno.EADDRINUSE, f"no local port apart from {port}")
    finally:
        for s in held:
            s.close()


def tcp(family: int, addr: tuple[str, int]) -> str:
    """``connected`` or the errno name of the failed connect."""
    try:
        s = apart_from(family, socket.SOCK_STREAM, addr[1])
    except OSError as exc:
        return errname(exc)
    s.settimeout(3)
    try:
        s.connect(addr)
        return "connected"
    except OSError as exc:
        return errname(exc)
    finally:
        s.close()


def dns_question(name: str) -> bytes:
    """A plain recursive A query (id 0x4567), built by hand: the probe has only the stdlib."""
    query = struct.pack(">HHHHHH", 0x4567, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return query + struct.pack(">HH", 1, 1)


def dns_answer(data: bytes) -> str:
    """The rcode's name, plus the address when the last answer is a single A record."""
    rcode = data[3] & 0x0F
    answers = struct.unpack(">H", data[6:8])[0]
    result = RCODES.get(rcode, f"rcode{rcode}")
    if rcode == 0 and answers and data[-6:-4] == b"\x00\x04":
        result += " " + socket.inet_ntoa(data[-4:])
    return result


def dns_query(server: tuple[str, int], name: str, family: int = socket.AF_INET) -> str:
    try:
        s = apart_from(family, socket.SOCK_DGRAM, server[1])
    except OSError as exc:
        return errname(exc)
    s.settimeout(2)
    try:
        s.connect(server)  # connected: an ICMP port-unreachable comes back as ECONNREFUSED
        s.send(dns_question(name))
        data = s.recv(4096)
    except OSError as exc:
        return errname(exc)
    finally:
        s.close()
    return dns_answer(data)


def udp_out(addr: tuple[str, int]) -> str:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", addr)
        return "sent"
    except OSError as exc:
        return errname(exc)
    finally:
        u.close()


def http_via_proxy(proxy_port: int, url: str, marker: str) -> tuple[str, bool]:
    """(status, whether the body carries the upstream's marker) for a GET through the gate."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    host = url.split("/")[2]
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "?"
    return status, marker in data.decode("latin-1")


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def observe(t: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["interfaces"] = [n for _, n in socket.if_nameindex()]
    out["routes4"] = len(_lines("/proc/net/route")[1:])
    out["routes6"] = len(
        [x for x in _lines("/proc/net/ipv6_route") if not x.rstrip().endswith("lo")]
    )
    out["tcp_out"] = tcp(socket.AF_INET, ("192.0.2.1", 443))
    out["tcp_metadata"] = tcp(socket.AF_INET, ("169.254.169.254", 80))
    out["tcp_host_loopback"] = tcp(socket.AF_INET, ("127.0.0.1", t["tcp_canary"]))
    out["tcp_gate_host_port"] = tcp(socket.AF_INET, ("127.0.0.1", t["gate_port"]))
    out["tcp6_out"] = tcp(socket.AF_INET6, ("2001:db8::1", 443))
    out["tcp6_host_loopback"] = tcp(socket.AF_INET6, ("::1", t["tcp6_canary"]))
    out["udp_out"] = udp_out(("192.0.2.1", 443))
    out["udp_host_loopback"] = dns_query(("127.0.0.1", t["udp_canary"]), "x.test")
    out["outside_resolvers"] = {
        ns: dns_query((ns, 53), "example.com", socket.AF_INET6 if ":" in ns else socket.AF_INET)
        for ns in t["resolvers"]
    }
    out["resolv_conf"] = sorted(
        x.split()[1] for x in _lines("/etc/resolv.conf") if x.startswith("nameserver")
    )
    out["dns_gate_allowed"] = dns_query(("127.0.0.1", 53), t["upstream_name"])
    out["dns_gate_refused"] = dns_query(("127.0.0.1", 53), t["refused_name"])
    proxy_port, marker = t["proxy_port"], t["marker"]
    for key, name in (("proxy_allowed", "upstream_name"), ("proxy_refused", "refused_name")):
        url = f"http://{t[name]}:{t['upstream_port']}/"
        out[key] = http_via_proxy(proxy_port, url, marker)
    status = dict(x.split(":", 1) for x in _lines("/proc/self/status") if ":" in x)
    out["caps"] = {k: status[k].strip() for k in ("CapEff", "CapBnd", "NoNewPrivs")}
    return out


def main() -> None:
    print(json.dumps(observe(json.loads(sys.stdin.readline()))))


if __name__ == "__main__":
    main()
