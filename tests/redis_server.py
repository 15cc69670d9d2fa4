"""A real ``redis-server`` (the Debian package) on loopback, for tests: a free port, no persistence,
waited for with a bounded readiness loop, stopped by PID. A missing binary fails the test with the fix
(make test installs it); it never skips."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import on_a_free_port, serving
from tests.prometheus_server import require_binary


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        on_a_free_port(self._start_on)
        return self

    def _start_on(self, port: int) -> None:
        self.port = port
        log = self.workdir / f"redis-{port}.log"
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(port),
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--protected-mode", "yes", "--daemonize", "no", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not self._ready():
            self.stop()
            said = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"redis-server did not start:\n{said}")

    def _ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    # this server's, not another process's that took the port (INFO names its pid)
                    conn.sendall(b"INFO server\r\n")
                    answer = b""
                    while b"\r\nprocess_id:" not in answer or not answer.endswith(b"\r\n"):
                        chunk = conn.recv(65536)
                        if not chunk or len(answer) > 1 << 20:
                            break
                        answer += chunk
                    if f"\r\nprocess_id:{self.proc.pid}\r\n".encode() in answer:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    yield from serving(RedisServer(directory).start())
