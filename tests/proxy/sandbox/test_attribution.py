"""Attribution inside a real `egress run`: real curl, python and git make requests through the real
gate; each decision names the process (pid as the sandbox sees it, the kernel's executable), its
parents up to the sandbox's command, the agent context and the trace. Upstreams count what arrives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.otlp_receiver import HttpReceiver
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO, egress

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

GIT_HTTP = "/usr/lib/git-core/git-remote-http"  # git's HTTP transport: the process that connects
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
PYTHON = os.path.realpath(sys.executable)


def _decisions(log: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in records if r["event"] == "egress.decision"]


def _script(port: int, pids: Path) -> str:
    """The command: records its own pid, then curl, python and git each make one request and
    record theirs (``exec`` keeps the pid)."""
    url = f"http://allowed.test:{port}"
    return f"""
echo "top $$" > {pids}
sh -c 'echo "curl $$" >> {pids}; exec curl -sS -m 10 -o /dev/null {url}/curl'
{PYTHON} -c 'import os, urllib.request
open("{pids}", "a").write(f"python {{os.getpid()}}\\n")
urllib.request.urlopen("{url}/python", timeout=10).read()'
sh -c 'echo "git $$" >> {pids}; exec git ls-remote {url}/repo.git' >/dev/null 2>&1
sh -c 'echo "tunnel $$" >> {pids}; exec curl -sS -m 10 -o /dev/null -p {url}/tunnel' 2>/dev/null
true
"""


def _pids(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_each_decision_names_its_process_and_the_chain_reaches_the_command(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = world
    log, pids = tmp_path / "decisions.jsonl", tmp_path / "pids"
    result = egress(
        "run", "--policy", str(policy), "--nameserver", dns.nameserver, "--decision-log",
        str(log), "--context", "task=T-1", "--summary", "json", "--",
        "sh", "-c", _script(upstream.port, pids),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = _pids(pids)
    by_path = {d["path"].split("?")[0]: d for d in _decisions(log) if d.get("path")}
    curl, python, git = by_path["/curl"], by_path["/python"], by_path["/repo.git/info/refs"]
    assert (curl["pid"], curl["exe"]) == (seen["curl"], "/usr/bin/curl")
    assert curl["argv"][0] == "curl" and curl["argv"][-1].endswith("/curl")
    assert (python["pid"], python["exe"]) == (seen["python"], PYTHON)
    assert git["exe"] == GIT_HTTP  # git runs its HTTP transport as a child process
    assert git["ppid"] == int(git["parents"][0].split()[0])
    assert f"{seen['git']} /usr/bin/git" in git["parents"]
    for d in (curl, python, git):  # up to the sandbox's command (sh -c, pid 2), and no further
        assert d["parents"][-1].startswith(f"{seen['top']} ")
        assert d["context"] == {"task": "T-1"}
        assert d["user_id"] == os.getuid() and d["user_name"]
        assert "trace_id" not in d
    assert python["parents"] == [curl["parents"][-1]]  # python is the command's own child
    # A CONNECT tunnel (the tunnel front end, not mitmproxy's layers): the CONNECT and the check
    # of its first bytes (plain HTTP where TLS is due: refused) both name the process.
    tunnel = [d for d in _decisions(log) if d["kind"] in ("connect", "tls")]
    assert [(d["kind"], d["decision"]) for d in tunnel] == [("connect", "allow"), ("tls", "deny")]
    assert {(d["pid"], d["exe"]) for d in tunnel} == {(seen["tunnel"], "/usr/bin/curl")}
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    exes = {p["exe"]: p for p in summary["processes"]}
    assert exes["/usr/bin/curl"]["pids"] == sorted([seen["curl"], seen["tunnel"]])
    assert exes[GIT_HTTP]["reasons"] == {"allowed-by-rule": exes[GIT_HTTP]["allowed"]}
    assert summary["refused"] == 1  # the tunnel's plain-HTTP first bytes


BOUND_POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: git-only
    hosts: [allowed.test]
    ports: [{port}]
    executables: [{exe}]
"""


def test_an_executable_bound_rule_allows_git_and_refuses_curl(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    _, dns, upstream = world
    policy = tmp_path / "bound.yaml"
    policy.write_text(BOUND_POLICY.format(port=upstream.port, exe=GIT_HTTP))
    log = tmp_path / "decisions.jsonl"
    url = f"http://allowed.test:{upstream.port}"
    script = f"""
curl -sS -m 10 -o /dev/null -w '%{{http_code}}\\n' {url}/curl
git ls-remote {url}/repo.git >/dev/null 2>&1
true
"""
    result = egress(
        "run", "--policy", str(policy), "--nameserver", dns.nameserver, "--decision-log",
        str(log), "--", "sh", "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "403"
    paths = [path for _, path, *_ in upstream.requests]
    assert paths and all(p.startswith("/repo.git/") for p in paths)  # curl's never arrived
    decisions = _decisions(log)
    refused = [d for d in decisions if d["decision"] == "deny"]
    assert [(d["exe"], d["reason"]) for d in refused] == [
        ("/usr/bin/curl", "executable-not-allowed")
    ]
    allowed = [d for d in decisions if d["decision"] == "allow"]
    assert allowed and {d["exe"] for d in allowed} == {GIT_HTTP}
    assert {d["rule"] for d in decisions} == {"git-only"}
    assert "executable-not-allowed" in result.stderr  # and the run's summary says why


def test_context_updates_from_the_host_and_never_from_inside(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = world
    state, sync = tmp_path / "state", tmp_path / "sync"
    sync.mkdir()
    log = tmp_path / "decisions.jsonl"
    url = f"http://allowed.test:{upstream.port}"
    channel = state / "run" / "sbx-ctx.sock"
    attack = (
        "import socket, json\n"
        "try:\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(CHANNEL)\n"
        "    s.sendall(json.dumps({'version': 1, 'set': {'task': 'evil'}}).encode() + b'\\n')\n"
        "    print('inside:', s.recv(4096))\n"
        "except OSError as exc:\n"
        "    print('inside: unreachable', exc.errno)\n"
    ).replace("CHANNEL", repr(str(channel)))
    script = f"""
curl -sS -m 10 -o /dev/null {url}/before
{PYTHON} -c "$ATTACK"
touch {sync}/ready
for i in $(seq 1 300); do [ -e {sync}/go ] && break; sleep 0.1; done
curl -sS -m 10 -o /dev/null {url}/after
"""
    env = {**clean_env(), "ATTACK": attack}
    run = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--sandbox-id", "sbx-ctx", "--state-dir", str(state), "--context",
         "task=T-1", "--decision-log", str(log), "--", "sh", "-c", script],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(300):
            if (sync / "ready").exists() or run.poll() is not None:
                break
            time.sleep(0.1)
        update = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "context", "sbx-ctx", "tool=call-2",
             "--state-dir", str(state)],
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=EGRESS_WAIT,
        )  # fmt: skip
        (sync / "go").touch()
        out, err = run.communicate(timeout=EGRESS_WAIT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err
    assert update.returncode == 0, update.stderr
    assert json.loads(update.stdout) == {"task": "T-1", "tool": "call-2"}
    assert "inside: unreachable" in out  # the state directory is hidden inside the sandbox
    by_path = {d["path"]: d for d in _decisions(log) if d.get("path")}
    assert by_path["/before"]["context"] == {"task": "T-1"}
    assert by_path["/after"]["context"] == {"task": "T-1", "tool": "call-2"}
    assert not channel.exists()  # removed when the sandbox ended


def test_traceparent_links_every_decision_to_the_agents_trace(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = world
    url = f"http://allowed.test:{upstream.port}"
    receiver = HttpReceiver()
    receiver.start()
    try:
        env = {**clean_env(), "TRACEPARENT": f"00-{TRACE}-{PARENT_SPAN}-01"}
        result = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy),
             "--nameserver", dns.nameserver, "--otlp-endpoint", receiver.endpoint,
             "--otlp-protocol", "http", "--quiet", "--", "sh", "-c",
             f"curl -sS -m 10 -o /dev/null {url}/a; curl -sS -m 10 -o /dev/null {url}/b"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=EGRESS_WAIT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        records = [
            r
            for r in receiver.wait_for(2)
            if r.event_name == "egress.decision" and r.attributes.get("url.path") in ("/a", "/b")
        ]
    finally:
        receiver.stop()
    assert len(records) == 2
    assert {r.trace_id for r in records} == {TRACE}
    spans = {r.span_id for r in records}
    assert len(spans) == 2 and PARENT_SPAN not in spans  # a span id of its own for each
    for r in records:
        assert r.attributes["egress.trace.parent_span_id"] == PARENT_SPAN
        assert r.attributes["process.executable.path"] == "/usr/bin/curl"
        assert isinstance(r.attributes["process.pid"], int)
        assert r.attributes["user.id"] == str(os.getuid())  # a string, as the conventions say
        assert r.attributes["process.command_args"][0] == "curl"


def test_an_invalid_traceparent_is_ignored_with_a_warning(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = world
    log = tmp_path / "decisions.jsonl"
    env = {**clean_env(), "TRACEPARENT": f"00-{TRACE.upper()}-{PARENT_SPAN}-01"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--decision-log", str(log), "--quiet", "--", "curl", "-sS", "-m", "10",
         "-o", "/dev/null", f"http://allowed.test:{upstream.port}/x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=EGRESS_WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TRACEPARENT ignored" in result.stderr
    decisions = _decisions(log)
    assert decisions and not any("trace_id" in d for d in decisions)


@pytest.mark.skipif(os.getuid() != 0, reason="the sandbox can write root's files only as root")
def test_a_bound_executable_is_read_only_inside_the_sandbox(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """A sandbox running as the file's owner could otherwise rewrite the binary the rule trusts."""
    _, _, upstream = world
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir(mode=0o755)
    tool.write_text("#!/bin/sh\necho genuine\n")
    tool.chmod(0o755)
    policy = tmp_path / "bound.yaml"
    policy.write_text(BOUND_POLICY.format(port=upstream.port, exe=tool))
    script = f"""
echo 'echo forged' >> {tool}; echo "append=$?"
mv {tool} {tool}.old; echo "rename=$?"
{tool}
"""
    result = egress("run", "--policy", str(policy), "--quiet", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert "append=0" not in result.stdout and "rename=0" not in result.stdout
    assert "genuine" in result.stdout and "forged" not in tool.read_text()
