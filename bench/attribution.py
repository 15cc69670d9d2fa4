"""What attributing one connection to its sandbox process costs (``SandboxProcesses.attribute``).

A real sandbox (the same namespaces ``egress run`` makes) runs IDLE idle processes (a busy agent:
shells, language servers, build tools) and one client process holding CONNECTIONS connections to the
sandbox's proxy listener - started after the idle ones (a fresh `curl`, the usual case) or before
them (a long-lived process). The benchmark accepts the connections as the gate does and times one
lookup per connection: the socket's inode (sock_diag, as the gate does, or the ``/proc/PID/net/tcp``
fallback), then the fd tables of the sandbox's processes, newest first, up to the first owner; and,
as a rule bound to executables needs, every owner.

The lookup runs once per connection in a worker thread, started when the connection is accepted
(overlapping the request's arrival); compare with a decision itself (``bench/decisions.py``: a few
microseconds) and with the connection set-up it overlaps.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

from proxy.attribution.procfs import SandboxProcesses
from proxy.sandbox.namespace import Listener, Sandbox, SandboxSpec

CONNECTIONS = 50
ROUNDS = 10

_COMMAND = """
import socket, subprocess, sys, time
idle, connections, client_last = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
HOLD = "import socket, sys, time; c = [socket.create_connection(('127.0.0.1', 3128)) for _ in range(%d)]; time.sleep(60)"
if not client_last:
    subprocess.Popen([sys.executable, "-c", HOLD % connections])
    time.sleep(0.3)
sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(idle)]
if client_last:
    subprocess.Popen([sys.executable, "-c", HOLD % connections])
time.sleep(60)
"""


def _percentiles(times: list[float]) -> tuple[float, float]:
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def measure(idle: int, client_last: bool, diag: bool) -> tuple[float, float, float, int]:
    """(p50, p99 of the first-owner lookup, p50 of the every-owner lookup, lookups that found)."""
    spec = SandboxSpec(
        argv=[
            sys.executable,
            "-I",
            "-c",
            _COMMAND,
            str(idle),
            str(CONNECTIONS),
            str(int(client_last)),
        ],
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
        time.sleep(0.5)  # let every idle process start
        processes = SandboxProcesses(
            sandbox.pid, ("127.0.0.1", 3128), diag=sandbox.sockets["diag"] if diag else None
        )
        peers = ["{}:{}".format(*conn.getpeername()) for conn in accepted]
        first: list[float] = []
        every: list[float] = []
        found = 0
        for _ in range(ROUNDS):
            for peer in peers:
                for times, every_owner in ((first, False), (every, True)):
                    started = time.perf_counter_ns()
                    result = processes.attribute(peer, every_owner=every_owner)
                    times.append((time.perf_counter_ns() - started) / 1000)
                    found += result is not None
        p50, p99 = _percentiles(first)
        return p50, p99, _percentiles(every)[0], found
    finally:
        for conn in accepted:
            conn.close()
        sandbox.kill()
        sandbox.close_sockets()


def main() -> int:
    print(
        f"{'sandbox':<34} {'socket lookup':<14} {'p50 us':>7} {'p99 us':>7} "
        f"{'every owner p50':>16}  found"
    )
    cases = [(2, True, True), (50, True, True), (50, False, True), (2, True, False)]
    for idle, client_last, diag in cases:
        p50, p99, every, found = measure(idle, client_last, diag)
        label = f"{idle} idle, client {'newest' if client_last else 'oldest'}"
        how = "sock_diag" if diag else "/proc/net/tcp"
        total = CONNECTIONS * ROUNDS * 2
        print(f"{label:<34} {how:<14} {p50:>7.0f} {p99:>7.0f} {every:>16.0f}  {found}/{total}")
        if found != total:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
