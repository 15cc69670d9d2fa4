"""``make bench``: every case against a no-proxy baseline in the same run, as one markdown table.

Builds what it needs on loopback: a throwaway CA, nginx as the TLS and plain-HTTP upstream
(``bench/_upstream.py``), the gates under test, and squid when ``BENCH_PEERS=1``. Every client run is
``bench/_client.py`` (curl, timed by a stdlib-only script), on the host or inside a sandbox, so every
row does the same work. Rounds are interleaved (round 1 of every configuration, then round 2, ...)
because the machine is shared and its speed drifts; a ratio is the median over rounds of the row's
figure divided by the no-proxy figure *of the same round*. Every run is printed after the table.

``BENCH_QUICK=1`` runs each case once with tiny counts: a smoke run that proves every row is produced,
not a measurement. Every process the bench starts is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench._serve import (
    byte_compile,
    clean_env,
    egress_command,
    start_serve,
    stop_process,
    stop_serve,
)
from bench._upstream import Nginx, free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent
CLIENT = str(ROOT / "bench" / "_client.py")
NA = "-"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    sequential: int  # new tunnels, one at a time
    parallel: int  # new tunnels, PARALLEL at a time
    bulk_mb: int
    keepalive: int  # plain-HTTP requests over one connection
    denials: int
    start_private: int  # `egress run -- true` with a private gate (slow: few runs)
    start_running: int  # `egress run -- true` handed to a running gate
    idle_tunnels: int
    decisions: int  # timed decisions per policy size
    reload_rules: int


# 5 rounds: several rows sit within a few hundredths of a peer's, which 3 rounds could not order
FULL = Sizes(5, 200, 600, 256, 2000, 50, 3, 10, 10_000, 40_000, 10_000)
QUICK = Sizes(1, 8, 32, 4, 40, 4, 1, 2, 200, 2_000, 1_000)
PARALLEL = 16
TARGETS = {
    "run_tunnels": 0.60,
    "serve_tunnels": 0.70,
    "run_bulk": 0.80,
    "start_running_ms": 50.0,
    "start_private_ms": 300.0,
    "denial_ms": 1.0,
    "decision_p99_us": 20.0,
    "idle_kib": 40.0,
    "telemetry_cost": 0.10,
}


@dataclass
class Config:
    """One row: how to wrap the client (a sandbox launcher or nothing) and where its proxy is."""

    name: str
    prefix: list[str]  # argv before the client (e.g. egress run ... --)
    proxy: str | None  # the proxy URL as the client sees it
    start: list[str] | None = None  # argv whose wall time is the row's start-up (CMD = true)
    unavailable: str = ""  # why the row could not run (printed as n/a with this reason)
    gate_pid: int | None = None  # the gate's process (tree), for CPU per tunnel and per MiB
    env: dict[str, str] = field(default_factory=dict)  # added to the client's environment
    cases: set[str] = field(default_factory=lambda: set(CASES) - {"inspected"})
    # case -> (prefix, proxy) where a case runs elsewhere (the inspected download: a gate whose
    # policy reads the upstream's requests)
    overrides: dict[str, tuple[list[str], str | None]] = field(default_factory=dict)


CASES = ("sequential", "parallel", "bulk", "inspected", "keepalive", "denial")
INSPECTED_HOST = "inspect.test"  # resolved by the gates' hosts file; its rule reads requests


def _client_spec(case: str, proxy: str | None, nginx: Nginx, sizes: Sizes) -> dict[str, object]:
    spec: dict[str, object] = {
        "proxy": proxy,
        "tls_port": nginx.tls_port,
        "http_port": nginx.http_port,
    }
    if case == "sequential":
        spec.update(case="tunnels", n=sizes.sequential, parallel=1)
    elif case == "parallel":
        spec.update(case="tunnels", n=sizes.parallel, parallel=PARALLEL)
    elif case == "bulk":
        spec.update(case="bulk")
    elif case == "inspected":
        spec.update(case="bulk", host=INSPECTED_HOST)
    elif case == "keepalive":
        spec.update(case="keepalive", n=sizes.keepalive)
    else:
        spec.update(case="denial", n=sizes.denials)
    return spec


def run_client(config: Config, case: str, nginx: Nginx, sizes: Sizes) -> dict[str, object]:
    prefix, proxy = config.overrides.get(case, (config.prefix, config.proxy))
    spec = _client_spec(case, proxy, nginx, sizes)
    argv = [*prefix, sys.executable, "-I", "-S", CLIENT, json.dumps(spec)]
    env = {**clean_env(), **config.env}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{config.name} / {case}: exit {proc.returncode}: {proc.stderr[-400:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def figure(case: str, result: dict[str, object], sizes: Sizes) -> float:
    """The one number a case yields: per second for rates, MB/s for bulk, ms for a denial."""
    times = result["times"]
    codes = result["codes"]
    assert isinstance(times, list) and isinstance(codes, dict)
    elapsed = float(str(result["elapsed"]))
    if case in ("sequential", "parallel", "keepalive"):
        expected = {"sequential": sizes.sequential, "parallel": sizes.parallel}.get(
            case, sizes.keepalive
        )
        if codes.get("200", 0) != expected:
            raise RuntimeError(f"{case}: expected {expected} answers of 200, got {codes}")
        return expected / elapsed
    if case in ("bulk", "inspected"):
        if int(float(str(result["size"]))) != sizes.bulk_mb << 20:
            raise RuntimeError(f"bulk: short transfer ({result['size']} bytes)")
        return float(str(result["speed"])) / 1e6
    return statistics.median(float(t) for t in times) * 1000  # denial, ms


def percentiles(result: dict[str, object]) -> tuple[float, float]:
    times = sorted(float(t) for t in result["times"])  # type: ignore[attr-defined]
    return times[len(times) // 2] * 1000, times[min(len(times) - 1, int(len(times) * 0.99))] * 1000


def timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        list(argv), capture_output=True, timeout=120, env={**clean_env(), **(env or {})}
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{list(argv)[:6]} failed: {proc.stderr.decode()[-400:]}")
    return elapsed * 1000


# -- the gates and peers under test ----------------------------------------------------------------


class Squid:
    """squid from Debian, one worker, no cache, allowing the upstream's ports on 127.0.0.1 only."""

    def __init__(self, root: Path, nginx: Nginx) -> None:
        binary = shutil.which("squid") or "/usr/sbin/squid"
        if not os.path.exists(binary):
            raise RuntimeError("squid is not installed (Debian: apt-get install squid)")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o777)  # squid drops to its own user for logs and the pid file
        self.port = free_port()
        conf = root / "squid.conf"
        conf.write_text(
            f"http_port 127.0.0.1:{self.port}\n"
            "acl bench dstdomain 127.0.0.1\n"
            f"acl upstream_ports port {nginx.tls_port} {nginx.http_port}\n"
            "acl CONNECT method CONNECT\n"
            "http_access allow bench upstream_ports\n"
            "http_access deny all\n"
            "cache deny all\ncache_mem 8 MB\naccess_log none\n"
            f"cache_log {root}/cache.log\npid_filename {root}/squid.pid\n"
            f"coredump_dir {root}\nshutdown_lifetime 0 seconds\n"
            "dns_nameservers 127.0.0.1\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_listening(self.proc, "squid", (self.port,), 20)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


def write_policy(path: Path, nginx: Nginx) -> None:
    path.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: bench\n    cidrs: [127.0.0.1/32]\n    ports: [{nginx.tls_port}, {nginx.http_port}]\n"
    )


def write_inspected_policy(path: Path, hosts: Path, nginx: Nginx) -> None:
    """A policy whose one rule reads requests (GET only): its tunnels are TLS-terminated by the gate,
    every request decided, the upstream verified against the bench CA."""
    hosts.write_text(f"127.0.0.1 {INSPECTED_HOST}\n")
    path.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: inspected\n    hosts: [{INSPECTED_HOST}]\n    ports: [{nginx.tls_port}]\n"
        "    methods: [GET]\n"
    )


QUIET_GATE = ("--no-metrics", "--decision-log", os.devnull)


def serve_supports(flag: str) -> bool:
    out = subprocess.run(
        [*egress_command(), "serve", "--help"], capture_output=True, text=True, env=clean_env()
    )
    return flag in out.stdout


# -- gate-only cases -----------------------------------------------------------------------------


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=None)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    new = min(max(soft, wanted), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the workers), from /proc."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total // 1024


async def _hold_tunnels(
    port: int, target: int, count: int, hello: bytes
) -> list[asyncio.StreamWriter]:
    """Open ``count`` tunnels, each with its ClientHello relayed and the ServerHello back, and keep
    them open (idle: nobody finishes the handshake)."""
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(64)

    async def one() -> None:
        async with gate, asyncio.timeout(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"tunnel refused: {head[:60]!r}")
            writer.write(hello)
            await reader.read(1)  # the upstream's ServerHello came back through the relay
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def idle_workers(count: int) -> int:
    """Gate processes needed to hold ``count`` tunnels (two sockets each) under the fd limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, -(-(2 * count + 1000) // soft))


def idle_tunnel_memory(policy: Path, nginx: Nginx, count: int, workers: int) -> float:
    """KiB of gate RSS (all workers) per idle passthrough tunnel with ``count`` of them held."""
    cap = str(workers * (count + 100))  # divided between workers, whose shares are uneven
    extra = ["--workers", str(workers)] if workers > 1 else []
    # One client opens every tunnel, faster than the default new-connection rate allows a client.
    rate = ("--max-new-connections-per-second", "100000", "--new-connections-burst", str(count * 2))
    proc, port = start_serve(
        policy, *QUIET_GATE, "--max-connections-per-client", cap, *rate, *extra
    )
    try:
        hello = _client_hello()

        async def measure() -> float:
            # a few tunnels first, so code loaded on first use is not counted per tunnel
            warm = await _hold_tunnels(port, nginx.tls_port, 20, hello)
            for w in warm:
                w.close()
            await asyncio.sleep(1.0)
            before = rss_kib(proc.pid)
            held = await _hold_tunnels(port, nginx.tls_port, count, hello)
            await asyncio.sleep(1.0)
            after = rss_kib(proc.pid)
            for w in held:
                w.close()
            return (after - before) / count

        return asyncio.run(measure())
    finally:
        stop_serve(proc)


def policy_reload_ms(
    root: Path, rules: int, runs: int
) -> tuple[list[float], list[float], list[float]]:
    """(load + validate + change diff ms, swap ms, free ms) per reload of a ``rules``-rule policy
    file. The first runs off the event loop in the gate; the swap (recording the reload, one
    reference assignment) runs on it between two requests; freeing the old policy's objects happens
    when its last reference goes (CPython holds the GIL for it, whichever thread drops it)."""
    from proxy.policy.loader import load_policy_file
    from proxy.policy.reload import PolicyHolder

    path = root / f"reload-{rules}.yaml"
    lines = ["version: 1", "rules:"]
    for i in range(rules):
        lines += [
            f"  - name: r{i}",
            f"    hosts: [h{i}.example.net, '*.s{i}.example.org']",
            "    ports: [443]",
        ]
    path.write_text("\n".join(lines) + "\n")
    holder = PolicyHolder(path, load_policy_file(str(path)))
    loads: list[float] = []
    swaps: list[float] = []
    frees: list[float] = []
    for run in range(runs):
        # an edit each time, so every swap has a rule to add and one to remove
        edited = path.read_text().replace(f"h{run}.example.net", f"x{run}.example.net")
        path.write_text(edited)
        started = time.perf_counter()
        new = holder.prepare()
        changes = holder.changes(new)
        retired = [holder()]
        prepared = time.perf_counter()
        holder.install(new, changes=changes)
        done = time.perf_counter()
        retired.clear()  # freeing the old policy's objects, timed on its own
        freed = time.perf_counter()
        if holder() is not new:
            raise RuntimeError("the reload benchmark's policy did not go into force")
        loads.append((prepared - started) * 1000)
        swaps.append((done - prepared) * 1000)
        frees.append((freed - done) * 1000)
    return loads, swaps, frees


def decision_rows(samples: int) -> list[tuple[str, float, float, bool]]:
    """(row, p50 us, p99 us, the target applies) for 10 / 10,000 / 100,000 rules, repeated
    requests (kept outcomes), then at 100,000 rules requests new to the policy's memo, then plain
    work of a 10-rule decision's length timed between the 100,000-rule decisions (the machine's own
    tail in those seconds: bench/decisions.py)."""
    import gc

    from bench.decisions import SIZES, _time_decisions, kept_decisions, not_kept, p50_p99_us

    def row(label: str, timings: list[int], target: bool) -> tuple[str, float, float, bool]:
        return (label, *p50_p99_us(timings), target)

    rows = []
    for size, policy, requests, kept, busy in kept_decisions(samples):
        rows.append(row(f"decision at {size:,} rules", kept, True))
        if size == SIZES[-1]:
            fresh = not_kept(requests, samples)
            rows.append(
                row(
                    f"decision not kept, at {size:,} rules",
                    _time_decisions(fresh, policy, samples),
                    False,
                )
            )
            rows.append(
                row("plain loop of a decision's length, beside them (machine)", busy, False)
            )
        gc.unfreeze()
    return rows


# -- the run ------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:  # nan
        return NA
    return f"{value:,.{digits}f}"


class Results:
    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], list[float]] = {}
        self.latency: dict[str, list[tuple[float, float]]] = {}
        self.failed: dict[tuple[str, str], str] = {}

    def add(self, config: str, case: str, value: float) -> None:
        self.runs.setdefault((config, case), []).append(value)

    def ratio(self, config: str, case: str, base: str, base_case: str = "") -> float:
        mine = self.runs.get((config, case), [])
        theirs = self.runs.get((base, base_case or case), [])
        pairs = [a / b for a, b in zip(mine, theirs, strict=False) if b]
        return _median(pairs)


def measure_matrix(
    configs: list[Config], nginx: Nginx, sizes: Sizes, results: Results, log: Callable[[str], None]
) -> None:
    for rnd in range(sizes.rounds):
        for case in CASES:
            for config in configs:
                if config.unavailable or (
                    case not in config.cases and case not in config.overrides
                ):
                    continue
                try:
                    cpu = cpu_seconds(config.gate_pid)
                    result = run_client(config, case, nginx, sizes)
                    results.add(config.name, case, figure(case, result, sizes))
                    if config.gate_pid is not None and case in ("parallel", "bulk"):
                        used = (cpu_seconds(config.gate_pid) - cpu) * 1000
                        per = sizes.parallel if case == "parallel" else sizes.bulk_mb
                        results.add(config.name, f"cpu-{case}", used / per)
                    if case == "sequential":
                        results.latency.setdefault(config.name, []).append(percentiles(result))
                except Exception as exc:
                    results.failed[(config.name, case)] = str(exc)[:300]
                    log(f"  {config.name} / {case}: FAILED {exc}")
        for config in configs:
            if config.start and not config.unavailable:
                runs = sizes.start_private if "private" in config.name else sizes.start_running
                if config.proxy == "env":  # a peer: a few runs suffice
                    runs = sizes.start_private
                for _ in range(max(1, runs // sizes.rounds)):
                    try:
                        results.add(config.name, "start", timed(config.start, config.env))
                    except Exception as exc:
                        results.failed[(config.name, "start")] = str(exc)[:300]
        log(f"  round {rnd + 1}/{sizes.rounds} done")


def per_user_gate_row(
    root: Path, egress: list[str], policy: Path, inside: str, stops: list[Callable[[], None]]
) -> Config:
    """`egress run --reuse-gate`: the per-user gate started once here (as a first run would), so
    the row measures every later run, handed to it with the run's own policy."""
    from proxy.sandbox import gatedir, usergate

    name = "`egress run --reuse-gate` (per-user gate)"
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime), "EGRESS_STATE_DIR": str(root / "user-gate-state")}
    try:
        directory = gatedir.private_dir(gatedir.gate_dir(env))
        pid = usergate.start(directory, environ={**clean_env(), **env})
    except gatedir.UserGateError as exc:
        return Config(name, [], None, unavailable=str(exc))
    stops.append(lambda: stop_pid(pid))
    run_reused = [*egress, "run", "--quiet", "--reuse-gate", "--policy", str(policy), "--"]
    return Config(name, run_reused, inside, start=[*run_reused, "true"], gate_pid=pid, env=env)


def stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after 10 s: a process this bench started but does not parent."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not (or no longer) this process's child
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its children (the workers), from /proc."""
    if pid is None:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def render_matrix(configs: list[Config], results: Results, direct: str) -> list[str]:
    head = (
        "| same work, one run | start ms | new TLS tunnels/s (seq) | ratio | tunnels/s (16 par) "
        "| ratio | added latency p50 / p99 ms | bulk MB/s | ratio | inspected bulk MB/s | ratio "
        "| keep-alive req/s | ratio | denial ms | gate CPU ms / tunnel | gate CPU ms / MiB |"
    )
    out = [head, "|---|" + "---:|" * 15]
    base_latency = results.latency.get(direct, [])
    for config in configs:
        if config.unavailable:
            out.append(f"| {config.name} | n/a: {config.unavailable} |" + " |" * 14)
            continue

        def med(case: str, digits: int = 0, config: Config = config) -> str:
            return _fmt(_median(results.runs.get((config.name, case), [])), digits)

        def rat(case: str, config: Config = config, base: str = "") -> str:
            if config.name == direct:
                return "1.00"
            return _fmt(results.ratio(config.name, case, direct, base or case), 2)

        lat = results.latency.get(config.name, [])
        if config.name == direct or not lat or not base_latency:
            added = NA
        else:
            p50 = _median([a[0] - b[0] for a, b in zip(lat, base_latency, strict=False)])
            p99 = _median([a[1] - b[1] for a, b in zip(lat, base_latency, strict=False)])
            added = f"{p50:.2f} / {p99:.2f}"
        start = med("start", 0) if config.start else NA
        denial = med("denial", 2) if config.proxy else NA
        has_inspected = "inspected" in config.overrides
        inspected = med("inspected") if has_inspected else NA
        inspected_ratio = rat("inspected", base="bulk") if has_inspected else NA
        out.append(
            f"| {config.name} | {start} | {med('sequential')} | {rat('sequential')} "
            f"| {med('parallel')} | {rat('parallel')} | {added} | {med('bulk')} | {rat('bulk')} "
            f"| {inspected} | {inspected_ratio} "
            f"| {med('keepalive')} | {rat('keepalive')} | {denial} "
            f"| {med('cpu-parallel', 2)} | {med('cpu-bulk', 2)} |"
        )
    return out


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({cpu}); "
        f"Linux {platform.release()}; Python {platform.python_version()}; "
        f"load average at start {load[0]:.2f}; {speed_probe():.0f} ms for a million additions"
    )


def speed_probe() -> float:
    """Best of three, in ms, of one million additions in a Python loop: how fast this machine runs
    the interpreter at the start of the run. A shared host's speed drifts by a factor of two between
    days; ratios within a run hold, absolute rates and start-up times move with this figure."""
    from bench.decisions import plain_work

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        plain_work(1_000_000)
        best = min(best, time.perf_counter() - started)
    return best * 1000


def run(sizes: Sizes, peers: bool, out: Callable[[str], None] = print) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.harness import LocalCA

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    header = machine()
    byte_compile()
    raise_fd_limit(4 * sizes.idle_tunnels + 4096)
    # a stopped bench still stops what it started (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stops: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        root = Path(tmp)
        try:
            ca = LocalCA(root / "ca", ["127.0.0.1", INSPECTED_HOST])
            nginx = Nginx(root / "nginx", ca.cert_path, ca.key_path, sizes.bulk_mb << 20)
            stops.append(nginx.stop)
            policy = root / "policy.yaml"
            write_policy(policy, nginx)
            egress = egress_command()
            direct = "no proxy (the limit)"
            configs = [
                Config(direct, [], None, start=["true"], cases=set(CASES) - {"denial", "inspected"})
            ]
            # The inspected download goes through gates of their own (a policy that reads requests
            # changes what a gate starts with), verifying the upstream against the bench CA.
            inspected_policy, hosts = root / "inspected.yaml", root / "hosts"
            write_inspected_policy(inspected_policy, hosts, nginx)
            inspecting = (
                "--hosts-file", str(hosts), "--upstream-ca", str(ca.ca_path),
                "--state-dir", str(root / "state"),
            )  # fmt: skip
            handoff_i = root / "gate-inspected.sock"
            serve_i, port_i = start_serve(
                inspected_policy, *QUIET_GATE, *inspecting, "--handoff-socket", str(handoff_i)
            )
            stops.append(lambda: stop_serve(serve_i))
            serve1, port1 = start_serve(policy, *QUIET_GATE)
            stops.append(lambda: stop_serve(serve1))
            configs.append(
                Config(
                    "`egress serve` (HTTPS_PROXY)",
                    [],
                    f"http://127.0.0.1:{port1}",
                    gate_pid=serve1.pid,
                    overrides={"inspected": ([], f"http://127.0.0.1:{port_i}")},
                )
            )
            if serve_supports("--workers"):
                serve2, port2 = start_serve(policy, *QUIET_GATE, "--workers", "2")
                stops.append(lambda: stop_serve(serve2))
                configs.append(
                    Config(
                        "`egress serve --workers 2`",
                        [],
                        f"http://127.0.0.1:{port2}",
                        gate_pid=serve2.pid,
                    )
                )
            inside = "http://127.0.0.1:3128"
            run_private = [*egress, "run", "--quiet", "--policy", str(policy), "--"]
            run_inspected = [
                *egress, "run", "--quiet", "--policy", str(inspected_policy), *inspecting, "--",
            ]  # fmt: skip
            configs.append(
                Config(
                    "`egress run` (private gate)",
                    run_private,
                    inside,
                    start=[*run_private, "true"],
                    overrides={"inspected": (run_inspected, inside)},
                )
            )
            handoff = root / "gate.sock"
            serve_h, _ = start_serve(policy, *QUIET_GATE, "--handoff-socket", str(handoff))
            stops.append(lambda: stop_serve(serve_h))
            run_handed = [*egress, "run", "--quiet", "--gate-socket", str(handoff), "--"]
            run_handed_i = [*egress, "run", "--quiet", "--gate-socket", str(handoff_i), "--"]
            configs.append(
                Config(
                    "`egress run --gate-socket` (running gate)",
                    run_handed,
                    inside,
                    start=[*run_handed, "true"],
                    gate_pid=serve_h.pid,
                    overrides={"inspected": (run_handed_i, inside)},
                )
            )
            configs.append(per_user_gate_row(root, egress, policy, inside, stops))
            if peers:
                from bench._peers import install_peers

                install_peers()  # squid too; a peer that cannot be installed says why in its row
                try:
                    squid = Squid(root / "squid", nginx)
                    stops.append(squid.stop)
                    configs.append(
                        Config(
                            "squid (C++)",
                            [],
                            f"http://127.0.0.1:{squid.port}",
                            gate_pid=squid.proc.pid,
                        )
                    )
                except RuntimeError as exc:
                    configs.append(Config("squid (C++)", [], None, unavailable=str(exc)))
                configs += peer_rows()
            log(f"bench: {header}")
            results = Results()
            # telemetry on vs off: two more gates, measured in the same rounds on parallel tunnels
            receiver, telemetry = telemetry_configs(root, policy, stops)
            measure_matrix([*configs, *telemetry], nginx, sizes, results, log)
            if receiver is not None:
                receiver.stop()
            log("  idle tunnels ...")
            workers = idle_workers(sizes.idle_tunnels)
            try:
                idle = idle_tunnel_memory(policy, nginx, sizes.idle_tunnels, workers)
            except Exception as exc:
                idle = float("nan")
                results.failed[("idle tunnels", "memory")] = str(exc)[:300]
            log("  decisions and reload ...")
            decisions = decision_rows(sizes.decisions)
            reload_ms, swap_ms, free_ms = policy_reload_ms(
                root, sizes.reload_rules, max(3, sizes.rounds)
            )
        finally:
            for stop in reversed(stops):
                with contextlib.suppress(Exception):
                    stop()
    lines = [f"Run: {header}; {sizes.rounds} round(s), medians.", ""]
    lines += render_matrix(configs, results, direct)
    lines += ["", "| gate case | result | target |", "|---|---:|---:|"]
    tel_on = results.runs.get(("telemetry on", "parallel"), [])
    tel_off = results.runs.get(("telemetry off", "parallel"), [])
    cost = 1 - _median([a / b for a, b in zip(tel_on, tel_off, strict=False) if b])
    cpu_on = results.runs.get(("telemetry on", "cpu-parallel"), [])
    cpu_off = results.runs.get(("telemetry off", "cpu-parallel"), [])
    cpu_cost = _median([a / b for a, b in zip(cpu_on, cpu_off, strict=False) if b]) - 1
    lines.append(
        f"| full telemetry (journal + OTLP + metrics) vs off, tunnels/s at 16 parallel | "
        f"{_fmt(_median(tel_on))} vs {_fmt(_median(tel_off))} (cost {cost * 100:.0f} %); "
        f"gate CPU per tunnel {_fmt(_median(cpu_on), 2)} vs {_fmt(_median(cpu_off), 2)} ms "
        f"({cpu_cost * 100:+.0f} %) | <= {TARGETS['telemetry_cost'] * 100:.0f} % |"
    )
    lines.append(
        f"| memory per idle passthrough tunnel, {sizes.idle_tunnels:,} held"
        f"{f' ({workers} workers: fd limit)' if workers > 1 else ''} | {idle:.1f} KiB | "
        f"<= {TARGETS['idle_kib']:.0f} KiB |"
    )
    for what, p50, p99, target in decisions:
        lines.append(
            f"| {what}, p50 / p99 | {p50:.2f} / {p99:.2f} µs | "
            + (f"p99 <= {TARGETS['decision_p99_us']:.0f} µs |" if target else "- |")
        )
    lines.append(
        f"| policy reload at {sizes.reload_rules:,} rules: load + validate + diff (off the loop) | "
        f"{_median(reload_ms):.0f} ms | - |"
    )
    lines.append(
        f"| policy reload at {sizes.reload_rules:,} rules: swap (on the loop) | "
        f"{_median(swap_ms):.3f} ms | - |"
    )
    lines.append(
        f"| policy reload at {sizes.reload_rules:,} rules: freeing the old policy | "
        f"{_median(free_ms):.1f} ms | - |"
    )
    lines += ["", "Every run (in round order):", ""]
    for (config, case), values in sorted(results.runs.items()):
        digits = 2 if case == "denial" or case.startswith("cpu-") else 0
        lines.append(f"- {config} / {case}: " + ", ".join(_fmt(v, digits) for v in values))
    for (config, case), why in sorted(results.failed.items()):
        lines.append(f"- {config} / {case}: FAILED: {why}")
    lines.append(f"- policy reload ms: {', '.join(f'{v:.0f}' for v in reload_ms)}")
    lines.append(f"- policy swap ms: {', '.join(f'{v:.3f}' for v in swap_ms)}")
    lines.append(f"- old policy freed ms: {', '.join(f'{v:.1f}' for v in free_ms)}")
    for line in lines:
        out(line)
    return 1 if results.failed else 0


def telemetry_configs(
    root: Path, policy: Path, stops: list[Callable[[], None]]
) -> tuple[object, list[Config]]:
    from tests.otlp_receiver import GrpcReceiver

    receiver = GrpcReceiver()
    receiver.start()
    stops.append(receiver.stop)
    off, off_port = start_serve(policy, *QUIET_GATE)
    stops.append(lambda: stop_serve(off))
    on, on_port = start_serve(
        policy,
        "--decision-log", str(root / "decisions.jsonl"),
        "--journal", str(root / "audit.jsonl"),
        "--metrics", "127.0.0.1:0",
        "--otlp-endpoint", receiver.endpoint,
        "--otlp-protocol", "grpc",
    )  # fmt: skip
    stops.append(lambda: stop_serve(on))
    return receiver, [
        Config(
            "telemetry off",
            [],
            f"http://127.0.0.1:{off_port}",
            cases={"parallel"},
            gate_pid=off.pid,
        ),
        Config(
            "telemetry on",
            [],
            f"http://127.0.0.1:{on_port}",
            cases={"parallel"},
            gate_pid=on.pid,  # its OTLP export process is a child: counted too
        ),
    ]


def peer_rows() -> list[Config]:
    """The npm-distributed peers; each row says precisely why it did not run when it cannot."""
    from bench._peers import peer_configs

    return peer_configs()


def main(*_: object) -> int:
    sizes = QUICK if os.environ.get("BENCH_QUICK") == "1" else FULL
    return run(sizes, peers=os.environ.get("BENCH_PEERS") == "1")


if __name__ == "__main__":
    raise SystemExit(main())
