"""``egress serve --credentials`` and ``egress credentials check|env`` as a user runs them: the
placeholders ``env`` prints are the ones the gate swaps, SIGHUP runs a command source again, and
no output shows a value."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.credentials_harness import EchoUpstream, write_credentials
from tests.dnsfake import FakeDns
from tests.harness import LocalCA, clean_env, serving
from tests.proxy.app.test_serve import EGRESS, Serve

pytestmark = pytest.mark.timeout(120)
TOKEN = "glpat-" + "FirstRealTokenValue0"
ROTATED = "glpat-" + "SecondRealTokenVal01"


@pytest.fixture
def upstream(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("gitlab", tls=test_ca.server_context()))


@pytest.fixture
def files(tmp_path: Path, upstream: EchoUpstream) -> tuple[Path, Path, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "allow_internal": ["127.0.0.0/8"],
                "rules": [{"name": "gitlab", "hosts": ["allowed.test"],
                           "ports": [upstream.port], "inspect": True}],
            }
        )
    )  # fmt: skip
    value = tmp_path / "value"
    value.write_text(TOKEN)
    credentials = write_credentials(
        tmp_path,
        [
            {
                "name": "gitlab",
                "source": {"command": ["cat", str(value)]},
                "hosts": [f"allowed.test:{upstream.port}"],
                "header": "PRIVATE-TOKEN",
                "env": ["GITLAB_TOKEN"],
            }
        ],
    )
    return policy, credentials, value


def egress(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS, *args], capture_output=True, text=True, timeout=60, env=clean_env()
    )


def test_check_prints_bindings_and_never_a_value(files: tuple[Path, Path, Path]) -> None:
    policy, credentials, _ = files
    result = egress("credentials", "check", str(credentials), "--policy", str(policy), "--read")
    assert result.returncode == 0, result.stderr
    assert "gitlab: allowed.test:" in result.stdout and "header private-token" in result.stdout
    assert "value readable" in result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_check_names_file_line_and_credential(
    tmp_path: Path, files: tuple[Path, Path, Path]
) -> None:
    policy, credentials, _ = files
    text = credentials.read_text().replace("allowed.test:", "elsewhere.test:")
    credentials.write_text(text)
    result = egress("credentials", "check", str(credentials), "--policy", str(policy))
    assert result.returncode != 0
    assert f"{credentials}:9: credential 'gitlab': key 'hosts'" in result.stderr
    assert str(policy) in result.stderr


def test_serve_swaps_rotates_on_sighup_and_env_prints_its_placeholders(
    files: tuple[Path, Path, Path],
    upstream: EchoUpstream,
    fake_dns: FakeDns,
    test_ca: LocalCA,
    tmp_path: Path,
) -> None:
    policy, credentials, value = files
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    state = tmp_path / "state"
    printed = egress("credentials", "env", str(credentials), "--policy", str(policy),
                     "--state-dir", str(state))  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    env = dict(line.split("=", 1) for line in printed.stdout.splitlines())
    placeholder = env["GITLAB_TOKEN"]
    assert placeholder.startswith("glpat-") and len(placeholder) == len(TOKEN)
    assert TOKEN not in printed.stdout
    assert os.stat(state / "credentials.key").st_mode & 0o777 == 0o600
    serve = Serve(
        "--policy", str(policy), "--credentials", str(credentials), "--state-dir", str(state),
        "--nameserver", fake_dns.nameserver, "--upstream-ca", str(test_ca.ca_path),
    )  # fmt: skip
    try:
        ca = state / "mitmproxy" / "mitmproxy-ca-cert.pem"

        def fetch() -> str:
            return subprocess.run(
                ["curl", "-sS", "--max-time", "10", "--proxy", f"http://127.0.0.1:{serve.port}",
                 "--cacert", str(ca), "-H", f"PRIVATE-TOKEN: {placeholder}",
                 f"https://allowed.test:{upstream.port}/api/v4/user"],
                capture_output=True, text=True, timeout=20, env=clean_env(),
            ).stdout  # fmt: skip

        assert "saw" in fetch()
        assert upstream.requests[-1][2]["private-token"] == TOKEN
        value.write_text(ROTATED)
        serve.proc.send_signal(__import__("signal").SIGHUP)
        serve.wait_for_line("credentials rotated: gitlab")
        fetch()
        assert upstream.requests[-1][2]["private-token"] == ROTATED
    finally:
        serve.stop()
    log = "".join(serve.lines)
    assert TOKEN not in log and ROTATED not in log
    assert '"credential": "gitlab"' in log or '"credential":"gitlab"' in log
