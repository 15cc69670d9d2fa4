"""``egress run`` with an ask rule: the person at the terminal is told which command answers the
pending approval, answers it, and the held request inside the sandbox completes. The admin API that
takes the answer lives on host loopback, which the sandbox cannot reach, through the gate or around it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import REPO

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-api
    action: ask
    hosts: [api.test]
    ports: [{port}]
    timeout: 30
"""

INSIDE = """\
curl -sS --max-time 40 -o /dev/null -w 'held %{{http_code}}\\n' http://api.test:{port}/inside
admin=$(cat {port_file})
curl -sS --max-time 5 --noproxy '' --proxy "$http_proxy" -o /dev/null \
  -w 'admin-through-gate %{{http_code}}\\n' "$admin/v1/approvals"
curl -sS --max-time 3 --noproxy '*' "$admin/v1/approvals" >/dev/null 2>&1 || echo 'admin-direct unreachable'
"""


class Run:
    """``egress run`` in the background, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.app.cli", "run", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_line(self, check: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if check(line):
                    return line
            time.sleep(0.05)
        raise AssertionError("no such line from egress run:\n" + "".join(self.lines))

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=60)
        self._reader.join(10)
        return self.proc.returncode, out


def answer(argv: list[str]) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "egress"
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", *argv[1:]],
        cwd=REPO, capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip


@pytest.mark.parametrize("as_json", [False, True])
def test_egress_run_says_how_to_answer_and_the_sandbox_cannot_reach_the_answer_desk(
    write_policy: Callable[[str], Path],
    fake_dns: FakeDns,
    http_upstream: Upstream,
    tmp_path: Path,
    as_json: bool,
) -> None:
    fake_dns.set("api.test", "A", ["127.0.0.1"])
    policy = write_policy(POLICY.format(port=http_upstream.port))
    port_file = tmp_path / "admin-url"
    port_file.write_text("http://127.0.0.1:9")
    script = INSIDE.format(port=http_upstream.port, port_file=port_file)
    run = Run(
        "--policy", str(policy), "--nameserver", fake_dns.nameserver, "--quiet",
        "--sandbox-id", "sbx-asks",
        *(["--json"] if as_json else []),
        "--", "sh", "-c", script,
    )  # fmt: skip
    if as_json:
        line = run.wait_line(lambda text: '"approval-pending"' in text)
        notice = json.loads(line)
        assert notice["sandbox_id"] == "sbx-asks" and notice["rule"] == "ask-api"
        argv = list(notice["approve"])
    else:
        run.wait_line(lambda text: "asks for HTTP api.test:" in text)
        line = run.wait_line(lambda text: text.startswith("egress:   egress approve "))
        argv = line.split("egress:   ", 1)[1].split()
    admin = argv[argv.index("--admin") + 1]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", admin)
    port_file.write_text(admin)
    time.sleep(0.3)
    assert http_upstream.accepted == 0  # held
    result = answer(argv)
    assert result.returncode == 0, result.stderr
    code, out = run.finish()
    assert code == 0, "".join(run.lines)
    assert out.splitlines() == [
        "held 200",
        "admin-through-gate 403",  # the gate refuses its own listeners, and has no rule for it
        "admin-direct unreachable",  # no route out of the sandbox
    ]
    assert http_upstream.accepted == 1
    decided = run.wait_line(lambda text: "approval-decided" in text or " approved by " in text)
    assert "approved" in decided


def test_a_session_grant_ends_with_the_sandbox_handed_to_a_shared_gate(
    write_policy: Callable[[str], Path],
    fake_dns: FakeDns,
    http_upstream: Upstream,
    tmp_path: Path,
) -> None:
    from tests.approvals_harness import ApprovalGate

    fake_dns.set("api.test", "A", ["127.0.0.1"])
    policy = write_policy(POLICY.format(port=http_upstream.port))
    sock = tmp_path / "gate.sock"
    directory = tmp_path / "gate"
    directory.mkdir()
    gate = ApprovalGate(policy, fake_dns.nameserver, directory, "--handoff-socket", str(sock))
    inside = (
        f"curl -sS --max-time 30 -o /dev/null -w '%{{http_code}}\\n' http://api.test:{http_upstream.port}/1; "
        f"curl -sS --max-time 30 -o /dev/null -w '%{{http_code}}\\n' http://api.test:{http_upstream.port}/2"
    )
    try:
        first = Run("--gate-socket", str(sock), "--sandbox-id", "sbx-session", "--quiet",
                    "--", "sh", "-c", inside)  # fmt: skip
        [pending] = gate.wait_pending()
        assert pending["sandbox_id"] == "sbx-session"
        assert gate.egress("approve", pending["id"], "--session").returncode == 0
        code, out = first.finish()
        assert (code, out.split()) == (0, ["200", "200"])  # the second one under the grant
        # The sandbox ended (the gate ends its grants once it sees the hand-off close): the same
        # id in a new sandbox asks again - a new pending approval, which is denied.
        gate.serve.wait_for_line("sandbox sbx-session ended")
        second = Run("--gate-socket", str(sock), "--sandbox-id", "sbx-session", "--quiet",
                     "--", "sh", "-c", inside.split(";")[0])  # fmt: skip
        [again] = gate.wait_pending()
        assert again["sandbox_id"] == "sbx-session" and again["id"] != pending["id"]
        assert gate.egress("deny", again["id"]).returncode == 0
        code, out = second.finish()
        assert (code, out.split()) == (0, ["403"])
        reasons = [d["reason"] for d in gate.decisions()]
        assert reasons[-1] == "approval-denied"
        assert http_upstream.accepted == 2
    finally:
        gate.stop()
