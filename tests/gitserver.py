"""A real git smart-HTTP server for tests: ``git http-backend`` run as CGI behind a small threaded
HTTP server on loopback, optionally over TLS, that records every request it receives.

The record is the proof for read-only rules: after a refused ``git push`` the server must have seen
no ``git-receive-pack`` request at all, while the bare repository it serves would accept one
(``http.receivepack`` is on).
"""

from __future__ import annotations

import http.server
import os
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

GIT = [
    "git",
    "-c",
    "user.name=t",
    "-c",
    "user.email=t@example.invalid",
    "-c",
    "init.defaultBranch=main",
]


class GitBackend(http.server.BaseHTTPRequestHandler):
    """Smart HTTP through `git http-backend` as CGI (the way a web server runs it)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real git servers do
    server: GitServer.Httpd

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            for _ in range(1_000_000):
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _cgi(self) -> None:
        path, _, query = self.path.partition("?")
        if "://" in path:  # absolute-form (from a proxy): keep only the path
            path = "/" + path.split("://", 1)[1].split("/", 1)[1]
        self.server.owner.record(self.command, self.path)
        body = self._body()
        env = {
            "GIT_PROJECT_ROOT": str(self.server.owner.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": "agent",  # git http-backend accepts pushes only from a named user
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        proc = subprocess.run(
            ["git", "http-backend"], input=body, capture_output=True, env=env, timeout=60
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


class GitServer:
    """Serves the bare repositories under ``root`` on 127.0.0.1:<ephemeral>; ``requests`` lists
    (method, target) of everything received."""

    class Httpd(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: GitServer

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.httpd = GitServer.Httpd(("127.0.0.1", 0), GitBackend)
        self.httpd.owner = self
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def record(self, method: str, target: str) -> None:
        with self._lock:
            self.requests.append((method, target))

    def saw(self, text: str) -> bool:
        with self._lock:
            return any(text in target for _, target in self.requests)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_repository(
    directory: Path, name: str = "demo.git", text: str = "hello through the gate\n"
) -> Path:
    """A bare repository with one commit (README), accepting pushes over HTTP."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    work = directory / "work"
    work.mkdir(parents=True)
    subprocess.run([*GIT, "init", "-q", str(work)], check=True)
    (work / "README").write_text(text)
    subprocess.run([*GIT, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*GIT, "-C", str(work), "commit", "-q", "-m", "first"], check=True)
    bare = directory / "repos" / name
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "config", "http.receivepack", "true"], check=True)
    return bare
