"""The benchmark's upstream: nginx on loopback, TLS with an ECDSA certificate and plain HTTP.

nginx (C, one worker) rather than a Python server so the upstream is never what limits a row: a
Python TLS server tops out near the proxy's own rate on this machine and would hide the gap between
direct and proxied. Serves ``/`` (a 2-byte body, for handshake-bound cases) and ``/bulk`` (a sparse
file of the requested size). Started and stopped by PID; nothing leaves loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench._serve import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[bytes], name: str, ports: tuple[int, ...], seconds: float
) -> None:
    """Until every port on 127.0.0.1 accepts; RuntimeError (with the process's last words) when
    it exits first or the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{name} exited: {err.strip()[-400:]}")
        try:
            if all(_accepts(port) for port in ports):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not listen within {seconds:.0f} s")


def _accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port``. A connect to an ephemeral-range port nobody
    listens on can pick that port as its own source and connect to itself: that is not a server."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
        return bool(probe.getsockname() != probe.getpeername())


class Nginx:
    def __init__(self, root: Path, cert: Path, key: Path, bulk_bytes: int) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise RuntimeError("nginx is required (Debian: apt-get install nginx-light)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        www = root / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("ok")
        with open(www / "bulk", "wb") as f:
            f.truncate(bulk_bytes)
        self.tls_port = free_port()
        self.http_port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the temp dir
        temp = "".join(
            f"  {name}_temp_path {root}/{name};\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = root / "nginx.conf"
        conf.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {root}/nginx.pid;\n"
            f"error_log {root}/error.log warn;\nworker_rlimit_nofile 65536;\n"
            "events { worker_connections 30000; }\n"
            "http {\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
            f"  client_header_timeout 300s;\n{temp}"
            "  default_type application/octet-stream;\n"
            f"  server {{\n    listen 127.0.0.1:{self.tls_port} ssl;\n"
            f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
            "    ssl_session_cache off;\n    ssl_session_tickets off;\n"
            f"    root {www};\n  }}\n"
            f"  server {{\n    listen 127.0.0.1:{self.http_port};\n    root {www};\n  }}\n"
            "}\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_listening(self.proc, "nginx", (self.tls_port, self.http_port), 10)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)  # SIGTERM: fast shutdown, the master stops its workers
        if self.proc.stderr is not None:
            self.proc.stderr.close()
