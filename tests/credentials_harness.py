"""Parts for credential tests: an upstream that records every request head and echoes the
``Authorization`` header back (in a response header and in the body), and a credentials file."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import yaml

from tests.harness import WAIT, Upstream

# Shaped like real tokens: the placeholders the gate issues must keep these prefixes and lengths.
GITHUB_TOKEN = "ghp_" + "R3alGithubTokenValue0123456789abcdefg"[:36]
NPM_TOKEN = "npm_" + "RealNpmTokenValue0123456789ABCDEFGHIJ"[:36]


class EchoUpstream(Upstream):
    """Like :class:`Upstream` (counts connections, records ``requests`` and raw ``heads``), but its
    answer echoes the request's Authorization header: in ``X-Echo`` and in the body."""

    def __init__(self, name: str = "echo", tls: ssl.SSLContext | None = None) -> None:
        self.bodies: list[bytes] = []
        super().__init__(name, tls=tls)

    def handle(self, raw: socket.socket) -> None:
        raw.settimeout(WAIT)
        conn = raw if self.tls is None else self.tls.wrap_socket(raw, server_side=True)
        with conn:
            buf: bytes | None = b""
            for _ in range(1000):
                while buf is not None and b"\r\n\r\n" not in buf:
                    buf = self._more(conn, buf)
                if buf is None:
                    return
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" "), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                while buf is not None and len(buf) < length:
                    buf = self._more(conn, buf)
                if buf is None:
                    return
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.heads.append(head)
                    self.requests.append((method, target, headers))
                    self.bodies.append(body)
                echo = headers.get("authorization", "-")
                payload = f"{self.name} saw authorization={echo} target={target}\n".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"X-Echo: {echo}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )


def write_credentials(directory: Path, credentials: list[dict[str, object]]) -> Path:
    path = directory / "credentials.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "credentials": credentials}, sort_keys=False))
    os.chmod(path, 0o600)
    return path


def write_secret(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


class AuthGitServer:
    """``git http-backend`` over TLS that answers 401 (Basic) unless the request carries
    ``expected`` as its Authorization header; records every Authorization header it received."""

    def __init__(self, root: Path, tls: ssl.SSLContext, expected: str) -> None:
        from proxy.app.demogit import GitBackend, GitServer

        seen: list[str] = []

        class Backend(GitBackend):
            def _cgi(self) -> None:
                given = self.headers.get("Authorization", "")
                seen.append(given)
                if given != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super()._cgi()

        self.authorizations = seen
        self.server = GitServer(root, tls=tls)
        self.server.httpd.RequestHandlerClass = Backend
        self.port = self.server.port

    def stop(self) -> None:
        self.server.stop()
