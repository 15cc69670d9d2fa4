"""``egress doctor``: an enforcement self-test a user runs on their own machine.

It builds a real sandbox with a private gate and, from inside, tries every way out the threat model
names; it then checks both ends: what the probe inside saw, and what canary listeners on the host's
loopback received (a refusal that still delivered a packet is a gap).

Nothing is sent off this machine. The probe only targets loopback, the sandbox's own namespace and
documentation addresses (192.0.2.1, 2001:db8::1) that have no route inside the empty namespace: the
kernel fails those connects with ENETUNREACH before any packet exists. The host's own resolvers are
probed only from inside the sandbox, where they are equally unroutable (or, if they are loopback
addresses, the sandbox's own empty loopback).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.sandbox.private_gate import GateStarter, PrivateGate

PROBE = Path(__file__).with_name("probe.py")  # run inside the sandbox as a script (stdlib only)
UPSTREAM_NAME = "upstream.egress-doctor.test"
REFUSED_NAME = "refused.egress-doctor.test"
MARKER = "egress-doctor-upstream"
_WAIT = 5.0


@dataclass
class Check:
    name: str
    expected: str
    observed: str
    ok: bool


class _Canary:
    """A host-loopback listener that counts what reaches it (TCP accepts or UDP datagrams)."""

    def __init__(self, family: int, kind: int, http: bool = False) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.sock = socket.socket(family, kind)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.hits = 0
        self.http = http
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(kind,), daemon=True)
        self._thread.start()

    def _loop(self, kind: int) -> None:
        while not self._stop.is_set():
            try:
                if kind == socket.SOCK_DGRAM:
                    _, addr = self.sock.recvfrom(4096)
                    self.hits += 1
                    self.sock.sendto(b"canary", addr)
                    continue
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits += 1
            with conn:
                if self.http:
                    self._answer(conn)

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        conn.settimeout(_WAIT)
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            body = MARKER.encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_WAIT)
        self.sock.close()


class _StubDns:
    """The gate's upstream resolver for the self-test: knows one name, answers it with 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        while not self._stop.is_set():
            try:
                wire, addr = self.sock.recvfrom(4096)
                query = dns.message.from_wire(wire)
            except TimeoutError:
                continue
            except Exception:
                if self._stop.is_set():
                    return
                continue
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append(name)
            response = dns.message.make_response(query)
            if name != UPSTREAM_NAME:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, "IN", "A", "127.0.0.1")
                )
            with contextlib.suppress(OSError):
                self.sock.sendto(response.to_wire(), addr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_WAIT)
        self.sock.close()


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The nameservers the host uses; the probe tries them from inside (where they have no route)."""
    found: list[str] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                found.append(parts[1].split("%")[0])
    return found[:3]


def evaluate(obs: dict[str, Any], canaries: dict[str, int], stub_queries: list[str]) -> list[Check]:
    """Turn the probe's observations and the canaries' counts into pass/fail rows."""
    unreachable = {"ENETUNREACH", "EHOSTUNREACH", "ECONNREFUSED", "EACCES", "EPERM"}

    def row(name: str, expected: str, observed: object, ok: bool) -> Check:
        return Check(name, expected, str(observed), ok)

    checks = [
        row("only loopback inside", "lo", ",".join(obs["interfaces"]), obs["interfaces"] == ["lo"]),
        row(
            "no IPv4/IPv6 routes",
            "0 / 0",
            f"{obs['routes4']} / {obs['routes6']}",
            obs["routes4"] == 0 and obs["routes6"] == 0,
        ),
        row(
            "direct TCP out (192.0.2.1:443)",
            "no route",
            obs["tcp_out"],
            obs["tcp_out"] in unreachable,
        ),
        row(
            "metadata address (169.254.169.254)",
            "no route",
            obs["tcp_metadata"],
            obs["tcp_metadata"] in unreachable,
        ),
        row("UDP out (192.0.2.1:443)", "no route", obs["udp_out"], obs["udp_out"] in unreachable),
        row(
            "IPv6 out ([2001:db8::1]:443)",
            "no route",
            obs["tcp6_out"],
            obs["tcp6_out"] in unreachable,
        ),
        row(
            "host loopback TCP service",
            "refused, 0 accepted",
            f"{obs['tcp_host_loopback']}, {canaries['tcp']} accepted",
            obs["tcp_host_loopback"] in unreachable and canaries["tcp"] == 0,
        ),
        row(
            "host loopback IPv6 service",
            "refused, 0 accepted",
            f"{obs['tcp6_host_loopback']}, {canaries['tcp6']} accepted",
            obs["tcp6_host_loopback"] in unreachable and canaries["tcp6"] == 0,
        ),
        row(
            "gate's own host port",
            "refused",
            obs["tcp_gate_host_port"],
            obs["tcp_gate_host_port"] in unreachable,
        ),
        row(
            "host loopback UDP service",
            "no answer, 0 received",
            f"{obs['udp_host_loopback']}, {canaries['udp']} received",
            # refused or silent: a question the probe could not even send proves nothing
            obs["udp_host_loopback"] in unreachable | {"timeout"} and canaries["udp"] == 0,
        ),
    ]
    resolvers = obs["outside_resolvers"]
    if resolvers:
        leaked = {
            ns: r
            for ns, r in resolvers.items()
            if r.startswith(("NOERROR", "NXDOMAIN", "SERV", "REF"))
        }
        checks.append(
            row(
                "host's resolvers (" + ",".join(resolvers) + ")",
                "unreachable",
                ", ".join(sorted(set(resolvers.values()))),
                not leaked,
            )
        )
    checks += [
        row(
            "resolv.conf inside",
            "127.0.0.1",
            ",".join(obs["resolv_conf"]),
            obs["resolv_conf"] == ["127.0.0.1"],
        ),
        row(
            "DNS gate: allowed name",
            "NOERROR 127.0.0.1",
            obs["dns_gate_allowed"],
            obs["dns_gate_allowed"] == "NOERROR 127.0.0.1",
        ),
        row(
            "DNS gate: refused name",
            "NXDOMAIN, no upstream query",
            f"{obs['dns_gate_refused']}, {stub_queries.count(REFUSED_NAME)} upstream",
            obs["dns_gate_refused"] == "NXDOMAIN" and REFUSED_NAME not in stub_queries,
        ),
        row(
            "proxy path: allowed request",
            "200 from upstream",
            " ".join(map(str, obs["proxy_allowed"])),
            obs["proxy_allowed"] == ["200", True] and canaries["upstream"] >= 1,
        ),
        row(
            "proxy path: refused request",
            "403",
            obs["proxy_refused"][0],
            obs["proxy_refused"][0] == "403" and not obs["proxy_refused"][1],
        ),
        row(
            "capabilities inside",
            "none, no_new_privs",
            f"eff={obs['caps']['CapEff']} bnd={obs['caps']['CapBnd']} nnp={obs['caps']['NoNewPrivs']}",
            int(obs["caps"]["CapEff"], 16) == 0
            and int(obs["caps"]["CapBnd"], 16) == 0
            and obs["caps"]["NoNewPrivs"] == "1",
        ),
    ]
    return checks


def run_doctor(start_gate: GateStarter) -> tuple[list[Check], str]:
    """Build the sandbox with a private gate, run the probe, return the rows (and any set-up error
    text). The probe reads its targets on stdin once the gate is up: the gate's port is one."""
    from proxy.sandbox import DEFAULT_PROXY_PORT
    from proxy.sandbox.launcher import RunOptions, run

    tcp = _Canary(socket.AF_INET, socket.SOCK_STREAM)
    tcp6 = _Canary(socket.AF_INET6, socket.SOCK_STREAM)
    udp = _Canary(socket.AF_INET, socket.SOCK_DGRAM)
    upstream = _Canary(socket.AF_INET, socket.SOCK_STREAM, http=True)
    stub = _StubDns()
    workdir = tempfile.mkdtemp(prefix="egress-doctor-")
    read_fd, write_fd = os.pipe()
    stack = contextlib.ExitStack()
    try:
        policy = Path(workdir) / "doctor.yaml"
        policy.write_text(
            "version: 1\nallow_internal: [127.0.0.1/32]\nrules:\n"
            f"  - name: doctor-upstream\n    hosts: [{UPSTREAM_NAME}]\n    ports: [{upstream.port}]\n"
        )
        output = stack.enter_context(tempfile.TemporaryFile(dir=workdir))  # noqa: SIM115
        errors = stack.enter_context(tempfile.TemporaryFile(dir=workdir))  # noqa: SIM115
        targets = {
            "proxy_port": DEFAULT_PROXY_PORT,
            "tcp_canary": tcp.port,
            "tcp6_canary": tcp6.port,
            "udp_canary": udp.port,
            "upstream_port": upstream.port,
            "upstream_name": UPSTREAM_NAME,
            "refused_name": REFUSED_NAME,
            "marker": MARKER,
            "resolvers": host_resolvers(),
        }

        def on_gate(gate: PrivateGate) -> None:
            targets["gate_port"] = gate.listen_address[1]
            os.write(write_fd, (json.dumps(targets) + "\n").encode())
            os.close(write_fd)

        options = RunOptions(
            argv=[sys.executable, "-I", str(PROBE)],
            policy_path=policy,
            sandbox_id="egress-doctor",
            quiet=True,
            nameservers=[f"127.0.0.1:{stub.port}"],
            stdin=read_fd,
            stdout=output,
            stderr=errors,
            on_gate=on_gate,
            gate=start_gate,
        )
        code = run(options)
        output.seek(0)
        errors.seek(0)
        text = output.read().decode("utf-8", "replace")
        err = errors.read().decode("utf-8", "replace")
        if code != 0 or not text.strip():
            return [], f"the probe did not run (exit {code}): {err.strip()}"
        observations = json.loads(text.strip().splitlines()[-1])
        counts = {"tcp": tcp.hits, "tcp6": tcp6.hits, "udp": udp.hits, "upstream": upstream.hits}
        return evaluate(observations, counts, stub.queries), ""
    finally:
        stack.close()
        os.close(read_fd)
        with contextlib.suppress(OSError):
            os.close(write_fd)
        for canary in (tcp, tcp6, udp, upstream):
            canary.stop()
        stub.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def render(checks: list[Check]) -> str:
    widths = [max(len(c.name) for c in checks), max(len(c.expected) for c in checks)]
    widths.append(max(len(c.observed) for c in checks))
    head = f"{'CHECK':<{widths[0]}}  {'EXPECTED':<{widths[1]}}  {'OBSERVED':<{widths[2]}}  RESULT"
    lines = [head, "-" * len(head)]
    for c in checks:
        result = "ok" if c.ok else "GAP"
        lines.append(
            f"{c.name:<{widths[0]}}  {c.expected:<{widths[1]}}  {c.observed:<{widths[2]}}  {result}"
        )
    return "\n".join(lines)


def doctor_main(start_gate: GateStarter, json_output: bool = False) -> int:
    import logging

    logging.getLogger("mitmproxy").setLevel(logging.ERROR)
    checks, error = run_doctor(start_gate)
    if error:
        if json_output:
            print(json.dumps({"ok": False, "error": error}))
        else:
            print(f"egress doctor: {error}", file=sys.stderr)
        return 1
    gaps = [c for c in checks if not c.ok]
    if json_output:
        print(json.dumps({"ok": not gaps, "checks": [c.__dict__ for c in checks]}))
    else:
        print(render(checks))
        if gaps:
            print(f"\n{len(gaps)} GAP(S): the sandbox is NOT a boundary on this machine.")
        else:
            print(f"\nall {len(checks)} checks passed: the gate is the sandbox's only route.")
    return 1 if gaps else 0
