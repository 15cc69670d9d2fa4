"""Reloading a 10,000-rule policy under load drops no request: a bounded load generator keeps plain
HTTP requests going through a real ``egress serve`` while the watcher loads, validates and swaps the
large policy in; every request before, during and after the swap gets the upstream's 200."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, serving
from tests.integration.test_live_reload import reloads, wait_for
from tests.proxy.app.test_serve import Serve

RULES = 10_000
CLIENTS = 3
MAX_REQUESTS_PER_CLIENT = 5_000  # bound: the generator stops here even if the reload never lands


def policy_text(port: int, extra: int) -> str:
    lines = ["version: 1", "allow_internal: [127.0.0.0/8]", "rules:"]
    lines += ["  - name: load", "    hosts: [load.test]", f"    ports: [{port}]"]
    for i in range(extra):
        lines += [f"  - name: r{i}", f"    hosts: [h{i}.example.net, '*.s{i}.example.org']"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    yield from serving(Upstream("load"))


class Load:
    """CLIENTS threads, each with a keep-alive connection through the gate (reopened when the gate
    closes it), counting every request and every one that did not get a 200."""

    def __init__(self, gate_port: int, upstream_port: int) -> None:
        self.gate_port, self.upstream_port = gate_port, upstream_port
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _client(self) -> None:
        conn: http.client.HTTPConnection | None = None
        url = f"http://load.test:{self.upstream_port}/"
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if self.stop.is_set():
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.gate_port, timeout=60)
                conn.request("GET", url, headers={"Host": f"load.test:{self.upstream_port}"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    with self._lock:
                        self.failed.append(f"status {response.status}")
                else:
                    with self._lock:
                        self.ok += 1
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_a_10000_rule_reload_under_load_fails_no_request(
    tmp_path: Path, upstream: Upstream
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream.port, 0))
    log = tmp_path / "decisions.jsonl"
    with FakeDns() as dns:
        dns.set("load.test", "A", ["127.0.0.1"])
        serve = Serve(
            "--policy", str(policy), "--decision-log", str(log),
            "--nameserver", dns.nameserver, "--watch-interval", "0.2",
        )  # fmt: skip
        try:
            with Load(serve.port, upstream.port) as load:
                wait_for(lambda: load.ok >= 20 or bool(load.failed), "requests before the reload")
                before = load.ok
                tmp = tmp_path / "policy.yaml.new"
                tmp.write_text(policy_text(upstream.port, RULES))
                os.replace(tmp, policy)
                wait_for(lambda: len(reloads(log)) == 1, "the 10,000-rule reload", timeout=120)
                during = load.ok
                wait_for(lambda: load.ok >= during + 20 or bool(load.failed), "requests after it")
            (event,) = reloads(log)
            assert event["result"] == "ok" and len(event["rules_added"]) == RULES
            assert load.failed == []
            assert during > before  # requests kept going while the policy loaded
            assert load.ok > during
        finally:
            serve.stop()
