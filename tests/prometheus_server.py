"""A real Prometheus server (the Debian ``prometheus`` package) on loopback, for tests.

It gets a generated scrape config and its own storage in a temporary directory, is waited for with a
bounded readiness loop, queried through its HTTP API and stopped by PID. The binaries are a hard
requirement (make test installs them): a missing one fails the test with the fix, it never skips.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness import on_a_free_port

INSTALL_HINT = (
    "run scripts/install-test-deps (make test does): it installs the Debian packages the tests use"
)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; {INSTALL_HINT}", pytrace=False)
    return path


class PrometheusServer:
    def __init__(self, targets: list[str], workdir: Path, scrape_interval: str = "1s") -> None:
        self.binary = require_binary("prometheus")
        self.targets = targets
        self.workdir = workdir
        self.scrape_interval = scrape_interval
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no need for a YAML writer
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": self.scrape_interval,
                        "evaluation_interval": self.scrape_interval,
                    },
                    "scrape_configs": [
                        {
                            "job_name": "agent-egress",
                            "scrape_interval": self.scrape_interval,
                            "scrape_timeout": self.scrape_interval,
                            "static_configs": [{"targets": self.targets}],
                        }
                    ],
                }
            )
        )
        return config

    def start(self, timeout: float = 30.0) -> None:
        config = self._write_config()
        on_a_free_port(lambda port: self._start_on(port, config, timeout))

    def _start_on(self, port: int, config: Path, timeout: float) -> None:
        self.port = port
        data = self.workdir / f"data-{port}"
        log = self.workdir / f"prometheus-{port}.log"
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        if not self._wait_ready(timeout):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{log.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200 and self._is_ours():
                        return True  # else another's: ours exits, its log says why
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            except http.client.HTTPException:
                # Not an HTTP answer: the probe connected to itself (the port is in the ephemeral
                # range and nothing listened on it yet), so it read back its own request.
                pass
            time.sleep(0.1)
        return False

    def _is_ours(self) -> bool:
        """Whether the prometheus answering on the port is the one started here, not another
        process's that took the port first: its storage path is this one's."""
        with urllib.request.urlopen(f"{self.url}/api/v1/status/flags", timeout=5) as resp:
            flags = json.loads(resp.read())["data"]
        return bool(flags.get("storage.tsdb.path") == str(self.workdir / f"data-{self.port}"))

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the ``result`` vector (raises on an API error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        return float(result[0]["value"][1])

    def wait_for_value(self, expr: str, expected: float, timeout: float = 30.0) -> float | None:
        """Bounded poll until ``expr`` evaluates to ``expected``; returns the last value seen."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last == expected:
                return last
            time.sleep(0.25)
        return last

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
