"""Real git, npm and pip inside ``egress run``, through a gate that inspects their TLS.

The servers are real and local (``git http-backend`` over TLS, a counting TLS upstream) and trust only
the test CA; the gate verifies them against it (``--upstream-ca``), and the sandbox trusts the gate's
own CA through the bundle ``egress run`` sets up. The read-only rules are the shipped presets' rules
pointed at the local servers. Each refusal must reach the user in the client's own output, and the
servers must have seen none of the refused requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dnsfake import FakeDns
from tests.gitserver import GIT, GitServer, make_repository
from tests.harness import LocalCA, Upstream, clean_env, serving

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parents[3]


def preset_rules(name: str, host: str, port: int) -> list[dict[str, Any]]:
    """The rules of a shipped preset that cover ``host``, pointed at allowed.test:``port``."""
    document = yaml.safe_load((REPO / "allowlists" / f"{name}.yaml").read_text())
    rules = []
    for rule in document["rules"]:
        if host in rule["hosts"]:
            rules.append({**rule, "hosts": ["allowed.test"], "ports": [port]})
    assert rules, f"{name} has no rules for {host}"
    return rules


def write_policy(directory: Path, rules: list[dict[str, Any]]) -> Path:
    path = directory / "policy.yaml"
    path.write_text(
        yaml.safe_dump({"version": 1, "allow_internal": ["127.0.0.0/8"], "rules": rules})
    )
    return path


def egress_run(
    policy: Path, dns: FakeDns, state: Path, script: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--state-dir", str(state), *extra, "--", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=150, env=clean_env(),
    )  # fmt: skip


@pytest.fixture
def dns(fake_dns: FakeDns) -> FakeDns:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    return fake_dns


@pytest.fixture
def git_tls(tmp_path: Path, test_ca: LocalCA) -> Iterator[GitServer]:
    bare = make_repository(tmp_path / "git", "myorg/demo.git")
    yield from serving(GitServer(bare.parent.parent, tls=test_ca.server_context()))


def test_git_clone_and_fetch_work_and_push_is_refused_with_the_reason(
    git_tls: GitServer, dns: FakeDns, test_ca: LocalCA, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, preset_rules("github-readonly", "github.com", git_tls.port))
    clone = tmp_path / "clone"
    url = f"https://allowed.test:{git_tls.port}/myorg/demo.git"
    commit = " ".join(GIT[1:])
    script = (
        f"git clone -q {url} {clone} && cat {clone}/README && cd {clone} && git fetch -q && "
        f"echo fetched && echo change > f && git {commit} add f && git {commit} commit -qm change && "
        "git push origin HEAD:main; echo push=$?"
    )
    result = egress_run(
        policy, dns, tmp_path / "state", script, "--upstream-ca", str(test_ca.ca_path)
    )
    assert result.returncode == 0, result.stderr
    assert "hello through the gate" in result.stdout and "fetched" in result.stdout
    assert "push=128" in result.stdout
    # git shows the refusal body as remote: lines
    assert "remote: agent-egress refused this request." in result.stderr, result.stderr
    assert "remote:   rule:    github-no-push" in result.stderr
    assert "The requested URL returned error: 403" in result.stderr
    # the server saw the clone and the fetch, and nothing of the push
    assert git_tls.saw("service=git-upload-pack") and git_tls.saw("/git-upload-pack")
    assert not git_tls.saw("receive-pack")


@pytest.fixture
def registry(test_ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("registry", tls=test_ca.server_context()))


def test_npm_publish_is_refused_and_npm_says_why(
    registry: Upstream, dns: FakeDns, test_ca: LocalCA, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path, preset_rules("npm-readonly", "registry.npmjs.org", registry.port)
    )
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"name": "egress-demo", "version": "1.0.0"}))
    registry_url = f"https://allowed.test:{registry.port}/"
    script = (
        f"cd {package} && HOME={tmp_path} npm publish --registry {registry_url} "
        f"--//allowed.test:{registry.port}/:_authToken=placeholder; echo npm=$?"
    )
    result = egress_run(
        policy, dns, tmp_path / "state", script, "--upstream-ca", str(test_ca.ca_path)
    )
    assert "npm=1" in result.stdout, result.stdout + result.stderr
    assert "403 Forbidden by agent-egress (request-not-allowed) - PUT" in result.stderr
    assert all(method != "PUT" for method, _, _ in registry.requests)


def test_pip_download_refused_and_pip_says_why(
    registry: Upstream, dns: FakeDns, test_ca: LocalCA, tmp_path: Path
) -> None:
    rules = preset_rules("pypi-readonly", "pypi.org", registry.port)
    rules[0]["paths"] = ["/simple/**"]  # the index only: a file download is refused
    policy = write_policy(tmp_path, rules)
    wheel = f"https://allowed.test:{registry.port}/files/x-1.0-py3-none-any.whl"
    script = (
        f"{sys.executable} -m pip download --no-deps --no-cache-dir --disable-pip-version-check "
        f"--no-index -d {tmp_path / 'dl'} {wheel}; echo pip=$?"
    )
    result = egress_run(
        policy, dns, tmp_path / "state", script, "--upstream-ca", str(test_ca.ca_path)
    )
    assert "pip=1" in result.stdout, result.stdout + result.stderr
    assert "403 Client Error: Forbidden by agent-egress (request-not-allowed)" in result.stderr
    assert registry.requests == []


def test_the_ca_key_is_not_readable_inside_the_sandbox(
    registry: Upstream, dns: FakeDns, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, preset_rules("pypi-readonly", "pypi.org", registry.port))
    state = tmp_path / "state"
    key = state / "mitmproxy" / "mitmproxy-ca.pem"
    script = (
        f"cat {key} && echo READ-THE-KEY; ls -A {state} | wc -l; "
        f"touch {state}/x 2>/dev/null && echo WROTE; "
        'grep -c "BEGIN CERTIFICATE" "$SSL_CERT_FILE"; grep -c "PRIVATE KEY" "$SSL_CERT_FILE"; '
        "for v in REQUESTS_CA_BUNDLE GIT_SSL_CAINFO NODE_EXTRA_CA_CERTS PIP_CERT; do "
        'eval "test \\"\\$$v\\" = \\"$SSL_CERT_FILE\\"" && echo same-$v; done'
    )
    result = egress_run(policy, dns, state, script)
    assert result.returncode == 0, result.stderr
    assert key.is_file() and b"PRIVATE KEY" in key.read_bytes()  # it exists outside
    lines = result.stdout.split()
    assert "READ-THE-KEY" not in result.stdout and "WROTE" not in result.stdout
    assert lines[0] == "0"  # the state directory is empty inside
    assert int(lines[1]) > 1 and lines[2] == "0"  # system CAs plus the gate's; no key
    assert [line for line in lines if line.startswith("same-")] == [
        "same-REQUESTS_CA_BUNDLE",
        "same-GIT_SSL_CAINFO",
        "same-NODE_EXTRA_CA_CERTS",
        "same-PIP_CERT",
    ]


def test_without_inspection_the_sandbox_keeps_its_own_trust(
    registry: Upstream, dns: FakeDns, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path, [{"name": "plain", "hosts": ["allowed.test"], "ports": [registry.port]}]
    )
    state = tmp_path / "state"
    script = f'echo "bundle=${{GIT_SSL_CAINFO:-none}}"; ls -A {state} | wc -l'
    result = egress_run(policy, dns, state, script)
    assert result.returncode == 0, result.stderr
    assert f"bundle={clean_env().get('GIT_SSL_CAINFO', 'none')}" in result.stdout  # as it was
    assert result.stdout.split()[-1] == "0"  # hidden all the same
