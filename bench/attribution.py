"""What attributing one connection to its sandbox process costs (``SandboxProcesses.attribute``).

A real sandbox (the same namespaces ``egress run`` makes) runs a command that starts IDLE idle
processes (a busy agent: shells, language servers, build tools) and then opens CONNECTIONS
connections to the sandbox's proxy listener and holds them. The benchmark accepts them as the gate
does and times, per connection, one lookup: the sandbox's TCP table, then the fd tables of its
processes. Printed: p50 and p99 per connection, for a small and a busy sandbox, with the socket
found through sock_diag (what the gate uses) and, for comparison, through ``/proc/PID/net/tcp``
(the fallback, whose cost grows with every socket on the host).

It runs once per connection, before the connection's first decision (step 3a); compare with the
decision itself (``bench/decisions.py``: a few microseconds) and the tunnel set-up it precedes.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

from proxy.attribution.procfs import SandboxProcesses
from proxy.sandbox.namespace import Listener, Sandbox, SandboxSpec

CONNECTIONS = 50
ROUNDS = 20

_COMMAND = """
import os, socket, subprocess, sys, time
idle = [subprocess.Popen(["sleep", "60"]) for _ in range(int(sys.argv[1]))]
conns = [socket.create_connection(("127.0.0.1", 3128)) for _ in range(int(sys.argv[2]))]
time.sleep(60)
"""


def measure(idle: int, diag: bool) -> tuple[float, float, int]:
    spec = SandboxSpec(
        argv=[sys.executable, "-I", "-c", _COMMAND, str(idle), str(CONNECTIONS)],
        env={"PATH": "/usr/bin:/bin"},
        listeners=[Listener("proxy", "tcp", 3128), Listener("diag", "diag", 0)],
    )
    sandbox = Sandbox.spawn(spec)
    listener = sandbox.sockets["proxy"]
    accepted: list[socket.socket] = []
    try:
        sandbox.start()
        listener.settimeout(20)
        for _ in range(CONNECTIONS):
            conn, _ = listener.accept()
            accepted.append(conn)
        time.sleep(0.5)  # let the idle processes start
        processes = SandboxProcesses(
            sandbox.pid, ("127.0.0.1", 3128), diag=sandbox.sockets["diag"] if diag else None
        )
        peers = ["{}:{}".format(*conn.getpeername()) for conn in accepted]
        times: list[float] = []
        found = 0
        for _ in range(ROUNDS):
            for peer in peers:
                started = time.perf_counter_ns()
                result = processes.attribute(peer)
                times.append((time.perf_counter_ns() - started) / 1000)
                found += result is not None
        times.sort()
        return statistics.median(times), times[int(len(times) * 0.99)], found
    finally:
        for conn in accepted:
            conn.close()
        sandbox.kill()
        sandbox.close_sockets()


def main() -> int:
    print(f"{'sandbox':<28} {'socket lookup':<15} {'p50 us':>8} {'p99 us':>8}  attributed")
    for idle in (2, 50):
        for diag in (True, False):
            p50, p99, found = measure(idle, diag)
            label = f"{idle} idle + 1 client process"
            how = "sock_diag" if diag else "/proc/net/tcp"
            print(f"{label:<28} {how:<15} {p50:>8.0f} {p99:>8.0f}  {found}/{CONNECTIONS * ROUNDS}")
            if found != CONNECTIONS * ROUNDS:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
