"""Real clients inside a real sandbox, through the real gate: pip from a TLS package index and git
over smart HTTP (`git http-backend`), both served on the host's loopback.

They use nothing but the environment `egress run` sets: pip finds the gate through PIP_PROXY /
HTTPS_PROXY, git through http_proxy.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.gitserver import GitServer, make_repository
from tests.harness import LocalCA, clean_env, serving
from tests.proxy.sandbox.conftest import allowed_test_policy

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[3]


def _egress_run(policy: Path, dns: FakeDns, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=100, env=clean_env(),
    )  # fmt: skip


class _Server:
    def __init__(self, handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.requests = 0
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> _Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel: egress_demo_pkg 1.0 with VALUE = 42."""
    files = {
        "egress_demo_pkg/__init__.py": b"VALUE = 42\n",
        "egress_demo_pkg-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: egress-demo-pkg\nVersion: 1.0\n"
        ),
        "egress_demo_pkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: egress-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("egress_demo_pkg-1.0.dist-info/RECORD,,")
    path = directory / "egress_demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("egress_demo_pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def tls_index(tmp_path: Path, test_ca: LocalCA) -> Iterator[_Server]:
    root = tmp_path / "index"
    (root / "packages").mkdir(parents=True)
    wheel = _wheel(root / "packages")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = root / "simple" / "egress-demo-pkg"
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../packages/{wheel.name}#sha256={sha}">{wheel.name}</a>'
        "</body></html>\n"
    )
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = _Server(handler)
    server.httpd.socket = test_ca.server_context().wrap_socket(
        server.httpd.socket, server_side=True
    )
    server.start()
    yield server
    server.stop()


def test_pip_installs_from_a_tls_index_through_the_gate(
    tls_index: _Server,
    test_ca: LocalCA,
    fake_dns: FakeDns,
    write_policy: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    target = tmp_path / "site"
    script = (
        f"{sys.executable} -m pip install --no-cache-dir --disable-pip-version-check -q "
        f"--index-url https://allowed.test:{tls_index.port}/simple/ --cert {test_ca.ca_path} "
        f"--target {target} egress-demo-pkg && "
        f'{sys.executable} -c \'import sys; sys.path.insert(0, "{target}"); '
        'import egress_demo_pkg; print("value", egress_demo_pkg.VALUE)\''
    )
    result = _egress_run(allowed_test_policy(write_policy, tls_index.port), fake_dns, script)
    assert result.returncode == 0, result.stderr
    assert "value 42" in result.stdout
    summary = re.search(r"(\d+) request\(s\) allowed, 0 refused", result.stderr)
    assert summary and int(summary.group(1)) >= 2, result.stderr  # the index page and the wheel


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    bare = make_repository(tmp_path)
    yield from serving(GitServer(bare.parent))


def test_git_clone_over_smart_http_through_the_gate(
    git_server: GitServer,
    fake_dns: FakeDns,
    write_policy: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    dest = tmp_path / "clone"
    script = (
        f"git clone -q http://allowed.test:{git_server.port}/demo.git {dest} && cat {dest}/README; "
        f"git ls-remote http://evil.test:{git_server.port}/demo.git >/dev/null 2>&1; echo evil=$?"
    )
    result = _egress_run(allowed_test_policy(write_policy, git_server.port), fake_dns, script)
    assert result.returncode == 0, result.stderr
    assert "hello through the gate" in result.stdout
    assert "evil=128" in result.stdout
    assert f"refused evil.test:{git_server.port}: no-matching-rule" in result.stderr
