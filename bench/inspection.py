"""Inspected vs passthrough TLS through one real ``egress serve``, in the same run.

Two names resolve (through the gate's hosts file) to one loopback HTTPS upstream: ``pass.test``, whose
rule has no request conditions (TLS relayed untouched), and ``inspect.test``, whose rule allows GET only
(TLS terminated by the gate with its CA, the upstream verified with ``--upstream-ca``, every request
decided). The gate is its own process (one core); the upstream is another; the clients run here.

Rows, each for both names:

- new connections/s: CONNECT, TLS handshake, one small GET, close (CONCURRENCY clients);
- keep-alive requests/s: KEEPALIVE_CLIENTS connections, small GETs back to back;
- bulk MB/s: curl downloading BULK_MB over one connection (curl's own speed), over HTTP/1.1 as the
  upstream speaks it (like for like: the target's row), and inspected once more over HTTP/2 between
  curl and the gate (mitmproxy frames HTTP/2 in Python: slower);
- the gate's peak RSS while curl downloads 1 GiB through the inspected name (sampled every 50 ms).

Targets: inspected bulk >= 0.5x passthrough; keep-alive inspected >= 1,000 requests/s.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._serve import clean_env, start_serve, stop_serve

SECONDS = 4.0
CONCURRENCY = 16
KEEPALIVE_CLIENTS = 8
BULK_MB = 256
RSS_MB = 1024
TARGET_BULK_RATIO = 0.5
TARGET_KEEPALIVE = 1000.0
NAMES = ("pass.test", "inspect.test")
SMALL = b"x" * 100


def _serve_upstream(cert: str, key: str, port_out: Any) -> None:
    """The upstream, in its own process: HTTP/1.1 keep-alive; /bulk/N answers N bytes of zeros."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(1 << 20)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                if target.startswith("/bulk/"):
                    size = int(target.rsplit("/", 1)[1])
                    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
                    sent = 0
                    while sent < size:
                        piece = chunk[: min(len(chunk), size - sent)]
                        writer.write(piece)
                        sent += len(piece)
                        await writer.drain()
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(SMALL), SMALL)
                    )
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, backlog=512)
        port_out.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


async def _open(
    proxy: int, name: str, port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    writer.write(f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head[:40])
    await writer.start_tls(ctx, server_hostname=name)
    return reader, writer


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> bool:
    writer.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


async def _new_connections(proxy: int, name: str, port: int, ctx: ssl.SSLContext) -> float:
    deadline = time.perf_counter() + SECONDS
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            try:
                reader, writer = await _open(proxy, name, port, ctx)
                try:
                    if await _get(reader, writer, f"{name}:{port}"):
                        done += 1
                finally:
                    writer.close()
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
                pass

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - started)


async def _keepalive(proxy: int, name: str, port: int, ctx: ssl.SSLContext) -> float:
    done = 0
    conns = [await _open(proxy, name, port, ctx) for _ in range(KEEPALIVE_CLIENTS)]
    for reader, writer in conns:  # warm: the first request opens the upstream connection
        await _get(reader, writer, f"{name}:{port}")
    deadline = time.perf_counter() + SECONDS

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if await _get(reader, writer, f"{name}:{port}"):
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.perf_counter() - started
    for _, writer in conns:
        writer.close()
    return done / elapsed


def _curl(
    proxy: int, name: str, port: int, size: int, cafile: Path, version: str = "--http1.1"
) -> float:
    """Bytes/s of one download, curl's own measure (setup excluded)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", version, "--proxy", f"http://127.0.0.1:{proxy}",
         "--cacert", str(cafile), "-w", "%{speed_download} %{size_download}",
         f"https://{name}:{port}/bulk/{size}"],
        capture_output=True, text=True, timeout=600, env=clean_env(), check=True,
    )  # fmt: skip
    speed, got = out.stdout.split()
    if int(float(got)) != size:
        raise RuntimeError(f"short download: {got} of {size} bytes")
    return float(speed)


def _peak_rss(pid: int, run: Any) -> tuple[float, float, Any]:
    """(RSS before, peak RSS during ``run()``, its result), in MiB."""
    import psutil

    process = psutil.Process(pid)
    before = process.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run()
    finally:
        stop.set()
        sampler.join(5)
    return before / 2**20, peak / 2**20, result


def _run() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.harness import LocalCA

    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        root = Path(tmp)
        ca = LocalCA(root / "ca", list(NAMES))
        queue: Any = multiprocessing.get_context("fork").Queue()
        upstream = multiprocessing.get_context("fork").Process(
            target=_serve_upstream, args=(str(ca.cert_path), str(ca.key_path), queue), daemon=True
        )
        upstream.start()
        port = int(queue.get(timeout=30))
        hosts = root / "hosts"
        hosts.write_text("127.0.0.1 pass.test inspect.test\n")
        policy = root / "policy.yaml"
        policy.write_text(
            "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
            f"  - name: passthrough\n    hosts: [pass.test]\n    ports: [{port}]\n"
            f"  - name: inspected\n    hosts: [inspect.test]\n    ports: [{port}]\n"
            "    methods: [GET]\n"
        )
        state = root / "state"
        proc, proxy = start_serve(
            policy, "--no-metrics", "--decision-log", os.devnull, "--hosts-file", str(hosts),
            "--state-dir", str(state), "--upstream-ca", str(ca.ca_path),
        )  # fmt: skip
        try:
            gate_ca = state / "mitmproxy" / "mitmproxy-ca-cert.pem"
            trust = root / "trust.pem"
            trust.write_bytes(ca.ca_path.read_bytes() + gate_ca.read_bytes())
            ctx = ssl.create_default_context(cafile=str(trust))
            ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT  # the test CA's leaves are minimal
            results: dict[str, dict[str, float]] = {}
            for name in NAMES:
                row = results[name] = {}
                row["new"] = asyncio.run(_new_connections(proxy, name, port, ctx))
                row["keepalive"] = asyncio.run(_keepalive(proxy, name, port, ctx))
                row["bulk"] = _curl(proxy, name, port, BULK_MB << 20, trust) / 2**20
            h2 = _curl(proxy, "inspect.test", port, BULK_MB << 20, trust, "--http2") / 2**20
            before, peak, speed = _peak_rss(
                proc.pid, lambda: _curl(proxy, "inspect.test", port, RSS_MB << 20, trust)
            )
        finally:
            stop_serve(proc)
            upstream.kill()
            upstream.join(5)
    passthrough, inspected = results["pass.test"], results["inspect.test"]
    print(f"inspected (TLS terminated, every request decided) vs passthrough, {SECONDS:.0f} s each")
    print(f"  {'':<26} {'passthrough':>12} {'inspected':>12} {'ratio':>7}")
    for key, label in (
        ("new", "new connections/s"),
        ("keepalive", f"keep-alive requests/s ({KEEPALIVE_CLIENTS})"),
        ("bulk", f"bulk MB/s ({BULK_MB} MiB)"),
    ):
        ratio = inspected[key] / passthrough[key] if passthrough[key] else 0.0
        print(f"  {label:<26} {passthrough[key]:>12.0f} {inspected[key]:>12.0f} {ratio:>6.2f}x")
    print(
        f"  {'bulk MB/s, client HTTP/2':<26} {'':>12} {h2:>12.0f} "
        f"{h2 / passthrough['bulk'] if passthrough['bulk'] else 0:>6.2f}x"
    )
    print(
        f"  gate RSS, {RSS_MB} MiB inspected download: {before:.0f} MiB before, "
        f"{peak:.0f} MiB peak ({speed / 2**20:.0f} MB/s)"
    )
    bulk_ok = inspected["bulk"] >= TARGET_BULK_RATIO * passthrough["bulk"]
    keepalive_ok = inspected["keepalive"] >= TARGET_KEEPALIVE
    print(
        f"targets: inspected bulk >= {TARGET_BULK_RATIO}x passthrough: "
        f"{'ok' if bulk_ok else 'BELOW TARGET'}; inspected keep-alive >= "
        f"{TARGET_KEEPALIVE:,.0f}/s: {'ok' if keepalive_ok else 'BELOW TARGET'}"
    )
    return 0 if bulk_ok and keepalive_ok else 1


def main(*_: Any) -> int:
    return _run()


if __name__ == "__main__":
    raise SystemExit(main())
