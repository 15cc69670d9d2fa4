"""Threat class 19: spoofing attribution from inside a real `egress run` sandbox.

A rule bound to git's HTTP transport must not be passed by a process that calls itself git (argv[0]),
by a copy of git's binary the sandbox made, or by git running code from a directory the sandbox
controls; the sandbox must not be able to move its decisions into another trace or context. Every
refusal is proven by the upstream's request count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO
from tests.proxy.sandbox.test_attribution import BOUND_POLICY as POLICY
from tests.proxy.sandbox.test_attribution import GIT_HTTP

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def setup(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> tuple[Path, FakeDns, Upstream]:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port, exe=GIT_HTTP))
    return policy, fake_dns, http_upstream


def _run(policy: Path, dns: FakeDns, log: Path, script: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--decision-log", str(log), "--quiet", "--", "sh", "-c", script],
        cwd=REPO, env={**clean_env(), **env}, capture_output=True, text=True, timeout=EGRESS_WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _refusals(log: Path) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [
        (r.get("exe", "?"), r["reason"])
        for r in records
        if r["event"] == "egress.decision" and r["decision"] == "deny"
    ]


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
def test_a_renamed_process_or_a_copied_binary_does_not_pass(
    setup: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = setup
    url = f"http://allowed.test:{upstream.port}"
    copy = tmp_path / "exec"
    copy.mkdir()
    shutil.copy2(GIT_HTTP, copy / "git-remote-http")
    for name in os.listdir("/usr/lib/git-core"):  # git looks up its helpers here too
        if not (copy / name).exists() and name.startswith("git-remote"):
            (copy / name).symlink_to(copy / "git-remote-http")
    log = tmp_path / "decisions.jsonl"
    argv0 = (
        "import os; os.execv('/usr/bin/curl', "
        f"['{GIT_HTTP}', '-sS', '-m', '10', '-o', '/dev/null', '{url}/renamed'])"
    )
    script = f"""
{sys.executable} -c "{argv0}"
GIT_EXEC_PATH={copy} git ls-remote {url}/copied.git >/dev/null 2>&1
true
"""
    _run(policy, dns, log, script)
    assert upstream.requests == []  # neither ever arrived
    refusals = _refusals(log)
    assert ("/usr/bin/curl", "executable-not-allowed") in refusals  # argv[0] proves nothing
    assert (str(copy / "git-remote-http"), "executable-not-allowed") in refusals
    assert {reason for _, reason in refusals} == {"executable-not-allowed"}


def test_the_sandbox_cannot_move_its_decisions_into_another_trace_or_context(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> None:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    policy = tmp_path / "open.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: t\n"
        f"    hosts: [allowed.test]\n    ports: [{http_upstream.port}]\n"
    )
    log = tmp_path / "decisions.jsonl"
    other = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    script = f"""
export TRACEPARENT={other}
curl -sS -m 10 -o /dev/null -H 'traceparent: {other}' -H 'X-Egress-Context: task=evil' \\
  http://allowed.test:{http_upstream.port}/x
"""
    _run(
        policy, fake_dns, log, script,
        TRACEPARENT=f"00-{TRACE}-00f067aa0ba902b7-01",
    )  # fmt: skip
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "egress.decision" and r.get("path") == "/x"]
    assert decisions and all(d["trace_id"] == TRACE for d in decisions)
    assert all("context" not in d for d in decisions)


MANAGED_BOUND = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: org-git
    hosts: [allowed.test]
    ports: [{port}]
    executables: [{exe}]
"""


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
def test_report_mode_under_a_managed_rule_bound_to_git_does_not_let_curl_through(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> None:
    """A team's report-mode policy learns inside the organisation's ceiling: where the managed
    policy lets only git reach a host, a gap report mode would let through is refused to curl
    (nothing reaches the upstream), and a local rule letting every process reach it does not load."""
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    managed = tmp_path / "managed.yaml"
    managed.write_text(MANAGED_BOUND.format(port=http_upstream.port, exe=GIT_HTTP))
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nallow_internal: [127.0.0.0/8]\nrules: []\n")
    log = tmp_path / "decisions.jsonl"
    url = f"http://allowed.test:{http_upstream.port}"
    before = http_upstream.accepted
    script = f"curl -sS -m 10 -o /dev/null {url}/gap || true\n"
    _run(local, fake_dns, log, script, EGRESS_MANAGED_POLICY=str(managed))
    assert http_upstream.requests == [] and http_upstream.accepted == before
    assert ("/usr/bin/curl", "executable-not-allowed") in _refusals(log)
    # control: git itself is let through the same gap (reported, and it reaches the upstream)
    _run(local, fake_dns, log, f"git ls-remote {url}/r.git >/dev/null 2>&1\ntrue\n",
         EGRESS_MANAGED_POLICY=str(managed))  # fmt: skip
    assert http_upstream.requests, "git's request never arrived"
    # a local rule that lets every process reach the host is past the ceiling: nothing runs
    local.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: wide\n"
        f"    hosts: [allowed.test]\n    ports: [{http_upstream.port}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(local), "--nameserver",
         fake_dns.nameserver, "--managed-policy", str(managed), "--quiet", "--", "true"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=EGRESS_WAIT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "rule 'wide'" in result.stderr and f"only for {GIT_HTTP}" in result.stderr
