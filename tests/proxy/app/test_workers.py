"""``egress serve --workers N``: one address served by several processes, one policy for all of them,
reload reaching every worker, a dead worker started again, and limits not multiplied."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from proxy.app.workers import per_worker_cap, reuseport_sockets, worker_file, worker_metrics
from tests.harness import Upstream, clean_env
from tests.proxy.app.test_serve import EGRESS, Serve, status


def test_per_worker_names_and_limits() -> None:
    assert worker_file("/var/log/audit.jsonl", 1) == "/var/log/audit.jsonl.w1"
    assert worker_file(None, 1) is None
    assert worker_metrics("127.0.0.1:9464", 2) == "127.0.0.1:9466"
    assert worker_metrics("127.0.0.1:0", 2) == "127.0.0.1:0"
    assert worker_metrics("[::1]:9464", 1) == "[::1]:9465"
    # the cap is divided, never multiplied: N workers together allow at most the configured cap
    assert per_worker_cap(512, 2) * 2 <= 512
    assert per_worker_cap(1, 4) == 1


def test_reuseport_sockets_share_one_port() -> None:
    socks = reuseport_sockets("127.0.0.1", 0, 3)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks)
        assert all(s.proto == socket.IPPROTO_TCP for s in socks)  # asyncio then sets TCP_NODELAY
    finally:
        for s in socks:
            s.close()


def _workers(serve: Serve) -> list[psutil.Process]:
    return psutil.Process(serve.proc.pid).children()


def _wait(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(120)
def test_workers_share_the_port_reload_together_and_restart(tmp_path: Path) -> None:
    upstream = Upstream("workers")
    policy = tmp_path / "policy.yaml"
    base = "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: pkgs\n    hosts: [pkgs.test]\n"
    policy.write_text(base)
    journal = tmp_path / "audit.jsonl"
    serve = Serve(
        "--policy", str(policy), "--workers", "2", "--journal", str(journal),
        "--nameserver", "127.0.0.1:9", "--hosts-file", "",
    )  # fmt: skip
    url = f"http://127.0.0.1:{upstream.port}/"
    try:
        assert serve.info["workers"] == "2"
        assert len(_workers(serve)) == 2
        # Before the reload nothing reaches the upstream, whichever worker takes the connection.
        assert [status(serve.port, url) for _ in range(24)] == ["403"] * 24
        assert upstream.accepted == 0
        # Both workers took connections (the kernel spreads them by address and port; 24 all on
        # one socket would be a 2^-23 chance), and each wrote its own hash chain.
        for index in (0, 1):
            lines = Path(f"{journal}.w{index}").read_text().splitlines()
            assert any(json.loads(line).get("reason") == "no-matching-rule" for line in lines)

        policy.write_text(
            base + f"  - name: local\n    cidrs: [127.0.0.1/32]\n    ports: [{upstream.port}]\n"
        )
        serve.proc.send_signal(signal.SIGHUP)
        _wait(lambda: sum("policy reloaded" in line for line in serve.lines) == 2)
        assert [status(serve.port, url) for _ in range(24)] == ["200"] * 24

        victim = _workers(serve)[0]
        victim.kill()
        serve.wait_for_line("starting it again")
        _wait(lambda: len(_workers(serve)) == 2 and victim not in _workers(serve))
        # The restarted worker enforces the policy in force (loaded from the file, as reloaded).
        assert [status(serve.port, url) for _ in range(24)] == ["200"] * 24
        survivors = _workers(serve)
    finally:
        assert serve.stop() == 0
        upstream.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in survivors)


def test_a_worker_count_below_one_is_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules: []\n")
    proc = subprocess.run(
        [EGRESS, "serve", "--policy", str(policy), "--workers", "0", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--workers 0" in proc.stderr
