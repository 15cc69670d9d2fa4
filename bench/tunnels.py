"""New tunnels/s through a real ``egress serve`` process: telemetry off vs all telemetry on.

Each tunnel is a full CONNECT, the 200, a TLS ClientHello checked by the gate, the upstream's ServerHello
back through the passthrough relay, and close. The gate runs as its own process (one core), the load and
the TLS upstream share this process (the other core). Both configurations run in the same invocation,
alternating rounds, and the table prints their ratio (target: telemetry on >= 0.9x telemetry off).

"All telemetry on" means: the JSON decision log to a file, the hash-chained journal (fsync=interval),
Prometheus metrics served, and OTel events exported over OTLP/gRPC to a receiver in this process.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._serve import clean_env, start_serve, stop_serve

ROUNDS = 3
SECONDS_PER_ROUND = 4.0
CONCURRENCY = 16


async def _upstream(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)  # the client closes after the handshake
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def _one_tunnel(proxy_port: int, target_port: int, client_ctx: ssl.SSLContext) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        writer.write(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return False
        await writer.start_tls(client_ctx, server_hostname=None)
        return True
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def _load(proxy_port: int, target_port: int, seconds: float) -> tuple[int, int]:
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    deadline = time.perf_counter() + seconds
    ok = failed = 0

    async def worker() -> None:
        nonlocal ok, failed
        while time.perf_counter() < deadline:
            if await _one_tunnel(proxy_port, target_port, client_ctx):
                ok += 1
            else:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ok, failed


async def _run() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.harness import LocalCA
    from tests.otlp_receiver import GrpcReceiver

    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        root = Path(tmp)
        ca = LocalCA(root / "ca", ["127.0.0.1"])
        server, port = await _upstream(ca.server_context())
        policy = root / "policy.yaml"
        policy.write_text(
            "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
            f"  - name: bench\n    cidrs: [127.0.0.1/32]\n    ports: [{port}]\n"
        )
        receiver = GrpcReceiver()
        receiver.start()
        env = clean_env()
        configs: dict[str, list[str]] = {
            "telemetry off": ["--no-metrics", "--decision-log", os.devnull],
            "telemetry on": [
                "--decision-log",
                str(root / "decisions.jsonl"),
                "--journal",
                str(root / "audit.jsonl"),
                "--metrics",
                "127.0.0.1:0",
                "--otlp-endpoint",
                receiver.endpoint,
                "--otlp-protocol",
                "grpc",
            ],
        }
        rates: dict[str, list[float]] = {name: [] for name in configs}
        failures: dict[str, int] = dict.fromkeys(configs, 0)
        try:
            for _ in range(ROUNDS):
                for name, extra in configs.items():
                    proc, proxy_port = start_serve(policy, *extra, env=env)
                    try:
                        await _load(proxy_port, port, 0.5)  # warm-up
                        started = time.perf_counter()
                        ok, failed = await _load(proxy_port, port, SECONDS_PER_ROUND)
                        rates[name].append(ok / (time.perf_counter() - started))
                        failures[name] += failed
                    finally:
                        stop_serve(proc)
        finally:
            receiver.stop()
            server.close()
        base = statistics.median(rates["telemetry off"])
        print(f"new tunnels/s through egress serve ({ROUNDS} rounds x {SECONDS_PER_ROUND:.0f} s, "
              f"{CONCURRENCY} concurrent clients, median)")  # fmt: skip
        print(f"  {'configuration':<15} {'tunnels/s':>10} {'ratio':>7} {'failed':>7}")
        for name in configs:
            rate = statistics.median(rates[name])
            print(f"  {name:<15} {rate:>10.0f} {rate / base:>6.2f}x {failures[name]:>7}")
        received = len(receiver.records) if hasattr(receiver, "records") else -1
        print(f"  OTLP records received during the run: {received}")
        return 0


def main(*_: Any) -> int:
    return asyncio.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
