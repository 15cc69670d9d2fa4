"""Threats 17 and 18 together: the automated reviewer reads data the sandbox chose (it may be a
model a prompt injection talks to), so it must hold nothing worth leaking. A real ``egress serve``
with a credential whose value is in the gate's environment, and a real reviewer command that
writes down the environment it was given: the real value is not in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.approvals_harness import ApprovalGate
from tests.credentials_harness import GITHUB_TOKEN, write_credentials
from tests.dnsfake import FakeDns
from tests.harness import WAIT, Upstream, curl, waited_for

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: api
    hosts: [api.test]
    inspect: true
  - name: ask-repo
    action: ask
    review: auto
    hosts: [repo.test]
    ports: [{port}]
"""

REVIEWER = """
import json, os, sys
json.load(sys.stdin)
with open({out!r}, "w") as handle:
    json.dump(dict(os.environ), handle)
print(json.dumps({{"decision": "allow", "reason": "fine"}}))
"""


@pytest.mark.timeout(120)
def test_the_reviewer_never_gets_a_credentials_value_in_its_environment(
    tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns.set("repo.test", "A", ["127.0.0.1"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port))
    credentials = write_credentials(
        tmp_path,
        [
            {
                "name": "github",
                "source": {"env": "EGRESS_REVIEWER_TEST_TOKEN"},
                "hosts": ["api.test"],
                "header": "Authorization",
            }
        ],
    )
    out = tmp_path / "reviewer-env.json"
    script = tmp_path / "reviewer.py"
    script.write_text(REVIEWER.format(out=str(out)))
    monkeypatch.setenv("EGRESS_REVIEWER_TEST_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("EGRESS_REVIEWER_TEST_COPY", f"token={GITHUB_TOKEN}")  # a copy, named other
    monkeypatch.setenv("EGRESS_REVIEWER_TEST_PLAIN", "kept")
    directory = tmp_path / "gate"
    directory.mkdir()
    gate = ApprovalGate(
        policy, fake_dns.nameserver, directory,
        "--credentials", str(credentials),
        "--reviewer", f"{sys.executable} {script}", "--reviewer-timeout", "20",
    )  # fmt: skip
    try:
        result = curl(f"http://repo.test:{http_upstream.port}/", gate.proxy, timeout=30)
        assert result.status == 200, result  # the reviewer ran and answered
        seen = waited_for(lambda: out.exists() and out.read_text(), "the reviewer's notes", WAIT)
    finally:
        gate.stop()
    assert GITHUB_TOKEN not in seen
    assert '"EGRESS_REVIEWER_TEST_PLAIN": "kept"' in seen  # the rest of the environment stays
