"""A local git server over HTTPS for the demo (and the tests): ``git http-backend`` run as CGI behind
a small threaded HTTP server on loopback, with a throwaway CA, recording every request it receives.

It stands in for GitHub so that ``make demo`` can show a push being refused without pushing anywhere
real: the bare repository it serves would accept the push (``http.receivepack`` is on), and its
request log shows that no ``git-receive-pack`` request ever reached it.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

GIT = ["git", "-c", "user.name=demo", "-c", "user.email=demo@example.invalid"]


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
            for _ in range(1_000_000):  # bounded: one iteration per chunk
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
    directory: Path, name: str = "myorg/demo.git", text: str = "hello through the gate\n"
) -> Path:
    """A bare repository with one commit (README) under ``directory/repos``, accepting pushes over
    HTTP. Raises FileNotFoundError when git is not installed."""
    if shutil.which("git") is None:
        raise FileNotFoundError("git is not installed")
    work = directory / "work"
    work.mkdir(parents=True)
    subprocess.run([*GIT, "-c", "init.defaultBranch=main", "init", "-q", str(work)], check=True)
    (work / "README").write_text(text)
    subprocess.run([*GIT, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*GIT, "-C", str(work), "commit", "-q", "-m", "first"], check=True)
    bare = directory / "repos" / name
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(work), str(bare)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(["git", "-C", str(bare), "config", "http.receivepack", "true"], check=True)
    return bare


def throwaway_ca(
    directory: Path, names: Sequence[str], lifetime: datetime.timedelta = datetime.timedelta(days=2)
) -> tuple[Path, Path, Path]:
    """A new CA and one leaf certificate for ``names`` (host names or IP addresses), written to
    ``directory`` as ``ca.pem``, ``leaf.pem`` and ``leaf.key``; returns those three paths. Key
    identifiers and key usage are included: Python's strict X.509 checks (3.13+) require them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def throwaway_tls(directory: Path, names: Sequence[str]) -> tuple[Path, ssl.SSLContext]:
    """:func:`throwaway_ca`'s CA certificate and a server context presenting its leaf."""
    ca, cert, key = throwaway_ca(directory, names, datetime.timedelta(days=1))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return ca, context


__all__ = ["GitServer", "make_repository", "throwaway_ca", "throwaway_tls"]
