"""What the sandbox costs: bulk throughput through it vs the same gate used directly, and start-up.

Throughput: curl downloads SIZE_MB over HTTPS (a CONNECT tunnel, TLS passed through after the gate
checked the ClientHello) from a loopback upstream. curl's own ``speed_download`` is used, so launcher
start-up is not in these numbers. Configurations, alternated within each round:

- ``serve, host curl``: ``egress serve`` used directly from the host (the baseline for the relay),
- ``run --proxy``: curl inside a sandbox joined to that same ``egress serve``: every byte crosses the
  launcher's splice relay,
- ``run --no-isolation``: the private in-process gate used from the host over loopback (the baseline
  for the in-namespace listener),
- ``run``: curl inside a sandbox with the private gate accepting on the listener created inside the
  sandbox's namespace (no relay at all),
- ``handoff gate, host curl``: a gate process with a hand-off socket (as ``egress serve
  --handoff-socket`` runs it) used directly from the host,
- ``run --gate-socket``: curl inside a sandbox whose listener was handed to that gate process.

Start-up: wall time of ``egress run --proxy URL -- true`` against a running gate, minus ``true`` run
directly, median of LATENCY_RUNS. Targets: throughput >= 0.9x, added latency <= 250 ms.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._serve import egress_command, start_serve, stop_serve
from tests.harness import LoopbackServer, recv_head

ROUNDS = 5
SIZE_MB = 128
LATENCY_RUNS = 10
TARGET_RATIO = 0.9
TARGET_ADDED_MS = 250.0


class _BulkUpstream(LoopbackServer):
    """HTTPS server that answers every request with SIZE_MB of zeros."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__(threaded=True, name="bulk-upstream")

    def handle(self, raw: socket.socket) -> None:
        size = SIZE_MB << 20
        chunk = memoryview(bytes(1 << 20))
        raw.settimeout(30)
        with self.ctx.wrap_socket(raw, server_side=True) as conn:
            if b"\r\n\r\n" not in recv_head(conn):
                return
            conn.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
            )
            for _ in range(SIZE_MB):
                conn.sendall(chunk)


def _curl(port: int) -> list[str]:
    return [
        "curl", "-sk", "-o", "/dev/null", "--max-time", "60",
        "-w", "%{speed_download} %{size_download}", f"https://127.0.0.1:{port}/bulk",
    ]  # fmt: skip


def _mb_per_s(proc: subprocess.CompletedProcess[str]) -> float:
    if proc.returncode != 0:
        raise RuntimeError(f"transfer failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    speed, size = proc.stdout.split()[-2:]
    if int(float(size)) != SIZE_MB << 20:
        raise RuntimeError(f"short transfer: {size} bytes")
    return float(speed) / (1 << 20)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


GATE_WITH_HANDOFF = r"""
import asyncio, sys
from addons.master import Gate, GateConfig
from proxy.evidence.emit import Emitter
from proxy.policy.loader import load_policy
from proxy.destinations.resolver import Resolver
from proxy.sandbox.handoff import HandoffServer, gate_attacher

async def main():
    policy = load_policy(sys.argv[1])
    gate = Gate(GateConfig(listen_host="127.0.0.1", listen_port=0), lambda: policy, Emitter([]),
                Resolver(nameservers=[]))
    await gate.start()
    server = HandoffServer(sys.argv[2], gate_attacher(gate))
    await server.start()
    print("ready", gate.listen_address[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _start_handoff_gate(policy: Path, path: Path) -> tuple[subprocess.Popen[str], int]:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", GATE_WITH_HANDOFF, str(policy), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=repo,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError("the hand-off gate did not start")
    return proc, int(line.split()[1])


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env())


def main(*_: Any) -> int:
    if shutil.which("curl") is None:
        print("curl is required")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.harness import LocalCA

    with tempfile.TemporaryDirectory(prefix="egress-bench-sandbox-") as tmp:
        root = Path(tmp)
        ca = LocalCA(root / "ca", ["127.0.0.1"])
        upstream = _BulkUpstream(ca.server_context())
        policy = root / "policy.yaml"
        policy.write_text(
            "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
            f"  - name: bench\n    cidrs: [127.0.0.1/32]\n    ports: [{upstream.port}]\n"
        )
        serve, gate_port = start_serve(
            policy, "--no-metrics", "--decision-log", os.devnull, env=_env()
        )
        gate = f"http://127.0.0.1:{gate_port}"
        handoff_sock = root / "gate.sock"
        handoff, handoff_port = _start_handoff_gate(policy, handoff_sock)
        curl = _curl(upstream.port)
        run = [*egress_command(), "run", "--quiet", "--policy", str(policy)]
        # Inside, NO_PROXY lists 127.0.0.1 (the sandbox's own loopback): name the proxy explicitly.
        inside = [*curl[:1], "--noproxy", "", "--proxy", "http://127.0.0.1:3128", *curl[1:]]
        configs = {
            "serve, host curl": [*curl[:1], "--proxy", gate, *curl[1:]],
            "run --proxy": [*egress_command(), "run", "--quiet", "--proxy", gate, "--", *inside],
            "run --no-isolation": [*run, "--no-isolation", "--", *curl[:1], "--noproxy", "",
                                   *curl[1:]],
            "run": [*run, "--", *inside],
            "handoff gate, host curl": [*curl[:1], "--proxy", f"http://127.0.0.1:{handoff_port}",
                                        *curl[1:]],
            "run --gate-socket": [*egress_command(), "run", "--quiet", "--gate-socket", str(handoff_sock),
                                  "--", *inside],
        }  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in configs}
        try:
            for _round in range(ROUNDS):
                for name, argv in configs.items():
                    rates[name].append(_mb_per_s(_run(argv)))
            direct = [_timed(["true"]) for _ in range(LATENCY_RUNS)]
            joined = [_timed([*egress_command(), "run", "--quiet", "--proxy", gate, "--", "true"])
                      for _ in range(LATENCY_RUNS)]  # fmt: skip
            private = [_timed([*run, "--", "true"]) for _ in range(3)]
            handed = [_timed([*egress_command(), "run", "--quiet", "--gate-socket", str(handoff_sock),
                              "--", "true"]) for _ in range(LATENCY_RUNS)]  # fmt: skip
        finally:
            handoff.kill()
            handoff.wait(10)
            stop_serve(serve)
            upstream.stop()

    med = {name: statistics.median(values) for name, values in rates.items()}
    # Paired within each round (same load on the shared cores), then the median of those ratios.
    pairs = {
        "run --proxy": "serve, host curl",
        "run": "run --no-isolation",
        "run --gate-socket": "handoff gate, host curl",
    }
    ratios = {
        name: statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))
        for name, base in pairs.items()
    }
    print(f"bulk HTTPS download through the gate ({SIZE_MB} MiB x {ROUNDS} rounds, median MiB/s;")
    print("  ratio = median of per-round ratios to the baseline measured in the same round)")
    print(f"  {'configuration':<20} {'MiB/s':>8} {'ratio':>7}  rounds")
    for name in configs:
        ratio = f"{ratios[name]:.2f}x" if name in ratios else "  base"
        rounds = " ".join(f"{v:.0f}" for v in rates[name])
        print(f"  {name:<20} {med[name]:>8.0f} {ratio:>7}  {rounds}")
    added = (statistics.median(joined) - statistics.median(direct)) * 1000
    print(f"start-up of `egress run --proxy URL -- true` ({LATENCY_RUNS} runs, median)")
    print(f"  true directly              {statistics.median(direct) * 1000:8.1f} ms")
    print(f"  egress run --proxy -- true {statistics.median(joined) * 1000:8.1f} ms"
          f"  (added {added:.1f} ms, target <= {TARGET_ADDED_MS:.0f})")  # fmt: skip
    handed_added = (statistics.median(handed) - statistics.median(direct)) * 1000
    print(f"  egress run --gate-socket -- true {statistics.median(handed) * 1000:8.1f} ms"
          f"  (added {handed_added:.1f} ms)")  # fmt: skip
    print(f"  egress run -- true (private gate, for reference) "
          f"{statistics.median(private) * 1000:8.1f} ms")  # fmt: skip
    ok = (
        min(ratios["run"], ratios["run --gate-socket"]) >= TARGET_RATIO and added <= TARGET_ADDED_MS
    )
    print(f"  targets (no-relay modes): throughput >= {TARGET_RATIO}x, added <= "
          f"{TARGET_ADDED_MS:.0f} ms: {'met' if ok else 'NOT met'}; the --proxy relay: "
          f"{ratios['run --proxy']:.2f}x")  # fmt: skip
    return 0


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=60, env=_env())
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {proc.stderr.decode()[-500:]}")
    return elapsed


if __name__ == "__main__":
    raise SystemExit(main())
