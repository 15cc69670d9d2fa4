"""Parts for credential tests: an upstream that records every request head and echoes the
``Authorization`` header back (in a response header and in the body), and a credentials file."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.credentials.loader import load_credentials
from proxy.credentials.store import CredentialStore
from proxy.policy.loader import load_policy
from tests.harness import LocalCA, RunningGate, Upstream, curl
from tests.security import inspecting, start_gate_with

# Shaped like real tokens: the placeholders the gate issues must keep these prefixes and lengths.
GITHUB_TOKEN = "ghp_" + "R3alGithubTokenValue0123456789abcdefg"[:36]
NPM_TOKEN = "npm_" + "RealNpmTokenValue0123456789ABCDEFGHIJ"[:36]


class EchoUpstream(Upstream):
    """Like :class:`Upstream` (counts connections, records ``requests`` and raw ``heads``), but its
    answer echoes the request's Authorization header: in ``X-Echo`` and in the body."""

    def __init__(self, name: str = "echo", tls: ssl.SSLContext | None = None) -> None:
        self.bodies: list[bytes] = []
        super().__init__(name, tls=tls)

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        with self._lock:
            self.bodies.append(body)
        echo = headers.get("authorization", "-")
        payload = f"{self.name} saw authorization={echo} target={target}\n".encode()
        return (
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


def credential_store(
    directory: Path, credentials: list[dict[str, object]], env: dict[str, str]
) -> CredentialStore:
    """The store of ``credentials`` (written to ``directory``) under the policy ``directory/p.yaml``,
    their ``env`` sources set only while it reads them."""
    path = write_credentials(directory, credentials)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return CredentialStore(load_credentials(path, load_policy(directory / "p.yaml")))


def gate_with_credentials(
    directory: Path, policy: str, nameserver: str, test_ca: LocalCA, store: CredentialStore
) -> RunningGate:
    """A gate reading the requests its policy inspects (upstreams trusted through ``test_ca``),
    adding ``store``'s credentials."""
    return start_gate_with(
        directory,
        policy,
        nameserver,
        config=inspecting(directory, test_ca),
        gate_kwargs={"credentials": store},
    )


def curl_through(gate: RunningGate, url: str, *args: str) -> Any:
    """curl ``url`` through ``gate``, trusting the CA it signs inspected tunnels with."""
    return curl(url, gate.url, *args, cacert=gate.ca)
