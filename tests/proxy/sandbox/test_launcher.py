"""`egress run` end to end: the real CLI, the real gate, real curl inside a real sandbox.

The upstreams and the DNS server run on the host's loopback; the gate (in the launcher, in the host's
network namespace) may reach them because the test policy allows 127.0.0.0/8. The sandbox can reach
them only through the gate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream, clean_env, terminate
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO, WORLD_POLICY, egress

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

WAIT = EGRESS_WAIT


def test_allowed_works_refused_gets_403_and_bypass_finds_no_route(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = world
    log = tmp_path / "decisions.jsonl"
    port = upstream.port
    script = f"""
curl -sS -m 10 http://allowed.test:{port}/ok; echo "allowed=$?"
curl -sS -m 10 -o /dev/null -w '%{{http_code}}\\n' http://evil.test:{port}/no; echo "refused=$?"
curl -sS -m 5 --noproxy '*' http://127.0.0.1:{port}/bypass; echo "bypass=$?"
unset HTTP_PROXY http_proxy ALL_PROXY all_proxy
curl -sS -m 5 http://127.0.0.1:{port}/unset; echo "unset=$?"
"""
    result = egress(
        "run",
        "--policy",
        str(policy),
        "--nameserver",
        dns.nameserver,
        "--sandbox-id",
        "sbx-test-1",
        "--decision-log",
        str(log),
        "--",
        "sh",
        "-c",
        script,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hello from http-upstream: GET /ok" in out
    assert "allowed=0" in out
    assert "403\nrefused=0" in out
    assert "bypass=7" in out and "unset=7" in out  # curl: couldn't connect
    assert upstream.accepted == 1  # only the allowed request arrived
    assert [r[1] for r in upstream.requests] == ["/ok"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "egress.decision"]
    assert decisions and all(d["sandbox_id"] == "sbx-test-1" for d in decisions)
    assert {d["host"] for d in decisions if d["decision"] == "deny"} == {"evil.test"}
    assert "sandbox sbx-test-1: 1 request(s) allowed, 1 refused" in result.stderr
    assert f"refused evil.test:{port}: no-matching-rule" in result.stderr


def test_dns_inside_is_the_dns_gate(world: tuple[Path, FakeDns, Upstream]) -> None:
    policy, dns, _ = world
    probe = """
import json, socket
out = {}
for name in ("allowed.test", "evil.test"):
    try:
        out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET)})
    except socket.gaierror as exc:
        out[name] = "gaierror"
print(json.dumps(out))
"""
    result = egress(
        "run", "--policy", str(policy), "--nameserver", dns.nameserver, "--quiet", "--",
        sys.executable, "-I", "-c", probe,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"allowed.test": ["127.0.0.1"], "evil.test": "gaierror"}
    assert dns.count("evil.test") == 0  # a refused name never produces an upstream query
    assert dns.count("allowed.test") >= 1
    assert result.stderr == ""  # --quiet


@pytest.mark.parametrize(("script", "code"), [("exit 3", 3), ("kill -KILL $$", 137)])
def test_exit_status(world: tuple[Path, FakeDns, Upstream], script: str, code: int) -> None:
    policy, _, _ = world
    result = egress("run", "--policy", str(policy), "--quiet", "--", "sh", "-c", script)
    assert result.returncode == code, result.stderr


def test_invalid_policy_fails_closed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [{name: x, hosts: [a.test], nonsense: 1}]\n")
    marker = tmp_path / "ran"
    result = egress("run", "--policy", str(bad), "--", "touch", str(marker))
    assert result.returncode == 125
    assert "was not run" in result.stderr and "bad.yaml" in result.stderr
    assert "bad.yaml:2: rule 'x': key 'nonsense'" in result.stderr  # every problem, located
    assert not marker.exists()


def test_no_user_namespaces_fails_closed_with_a_hint(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The kernel refusing namespaces (here: max_user_namespaces = 0 in an outer namespace) must
    stop the command, say why and what to do."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    policy, _, _ = world
    marker = tmp_path / "ran"
    inner = (
        "echo 0 > /proc/sys/user/max_user_namespaces && exec "
        f"{sys.executable} -m proxy.app.cli run --policy {policy} -- touch {marker}"
    )
    result = subprocess.run(
        [unshare, "-U", "-r", "sh", "-c", inner],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 125, result.stderr
    assert "cannot isolate the command, so it was not run" in result.stderr
    assert "max_user_namespaces" in result.stderr
    assert not marker.exists()


def test_no_isolation_warns_loudly(world: tuple[Path, FakeDns, Upstream]) -> None:
    policy, _, _ = world
    result = egress("run", "--policy", str(policy), "--no-isolation", "--", "true")
    assert result.returncode == 0
    assert "WARNING: --no-isolation" in result.stderr
    assert "NOT isolated" in result.stderr


def test_joining_a_running_gate(
    world: tuple[Path, FakeDns, Upstream], start_gate: Callable[..., RunningGate]
) -> None:
    policy, _, upstream = world
    gate = start_gate(policy)
    port = upstream.port
    script = f"""
curl -sS -m 10 http://allowed.test:{port}/joined; echo "allowed=$?"
curl -sS -m 10 -o /dev/null -w '%{{http_code}}\\n' http://evil.test:{port}/; echo "refused=$?"
curl -sS -m 5 --noproxy '*' http://127.0.0.1:{gate.port}/; echo "gate-direct=$?"
"""
    result = egress("run", "--proxy", gate.url, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert "hello from http-upstream: GET /joined" in result.stdout
    assert "403\nrefused=0" in result.stdout
    assert "gate-direct=7" in result.stdout  # the gate's host port itself is not reachable inside
    assert "2 connection(s) relayed" in result.stderr
    assert [d.host for d in gate.decisions if not d.allowed] == ["evil.test"]


def _as_nobody(shared: Path, argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (shell words) as uid/gid 65534 with no capabilities and no groups.

    The interpreter lives under /root (mode 0700 here), so a private mount namespace first puts a
    world-readable tmpfs over /root with the interpreter bound back in: nothing on the host changes.
    """
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the other tests cover this path")
    real = Path(sys.executable).resolve()
    binds = ""
    if real.parts[1] == "root":
        hidden = Path(*real.parts[:3])  # e.g. /root/.pyenv
        binds = (
            f"mkdir -p {shared}/mnt && mount --bind {hidden} {shared}/mnt && "
            f"mount -t tmpfs -o mode=755 egress-test /root && mkdir -p {hidden} && "
            f"mount --move {shared}/mnt {hidden} && "
        )
    script = (
        f"mount --make-rprivate / && {binds}"
        f"exec setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"env -u EGRESS_STATE_DIR -u XDG_STATE_HOME HOME={shared} {argv}"
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(),
    )  # fmt: skip


def _forbidden(result: subprocess.CompletedProcess[str]) -> bool:
    """A kernel without unprivileged user namespaces: the required behaviour is failing closed."""
    if result.returncode in (1, 125) and "user namespace" in result.stderr:
        assert "65534" not in result.stdout  # the command did not run
        return True
    return False


def test_unprivileged_user(world: tuple[Path, FakeDns, Upstream]) -> None:
    """The whole `egress run` as uid 65534 with no capabilities: user namespaces do the work."""
    _, dns, upstream = world
    shared = Path(tempfile.mkdtemp(prefix="egress-unpriv-"))
    try:
        shared.chmod(0o777)
        policy = shared / "policy.yaml"
        policy.write_text(WORLD_POLICY.format(port=upstream.port))
        policy.chmod(0o644)
        result = _as_nobody(
            shared,
            f"{sys.executable} -m proxy.app.cli run --policy {policy} "
            f"--nameserver {dns.nameserver} -- sh -c "
            f"'id -u; curl -sS -m 10 http://allowed.test:{upstream.port}/nobody; "
            f'curl -sS -m 5 --noproxy "*" http://127.0.0.1:{upstream.port}/; echo bypass=$?\'',
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if _forbidden(result):
        return
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "65534"
    assert "hello from http-upstream: GET /nobody" in result.stdout
    assert "bypass=7" in result.stdout
    assert upstream.accepted == 1


def test_doctor_unprivileged() -> None:
    shared = Path(tempfile.mkdtemp(prefix="egress-unpriv-"))
    try:
        shared.chmod(0o777)
        result = _as_nobody(shared, f"{sys.executable} -m proxy.app.cli doctor --json")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if _forbidden(result):
        return
    report = json.loads(result.stdout)
    assert report["ok"] is True, result.stdout
    assert result.returncode == 0


def test_nothing_left_behind(world: tuple[Path, FakeDns, Upstream], tmp_path: Path) -> None:
    policy, _, _ = world
    before_mounts = Path("/proc/self/mountinfo").read_text()
    result = egress(
        "run", "--policy", str(policy), "--quiet", "--",
        "sh", "-c", "sleep 300 & echo $(readlink /proc/self/ns/net)",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    inode = int(result.stdout.strip().split("[")[1].rstrip("]"))
    deadline = time.monotonic() + 10
    from tests.proxy.sandbox.conftest import processes_in_netns

    while processes_in_netns(inode) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in_netns(inode) == []
    assert Path("/proc/self/mountinfo").read_text() == before_mounts


def test_joined_mode_relays_dns_to_the_given_dns_gate(
    world: tuple[Path, FakeDns, Upstream], start_gate: Callable[..., RunningGate]
) -> None:
    """--dns relays the sandbox's 127.0.0.1:53 (UDP and TCP) to the shared gate's DNS gate; here a
    programmed DNS server stands in for it, so the answer proves the path."""
    policy, dns, _ = world
    dns.set("relayed.test", "A", ["192.0.2.77"])
    gate = start_gate(policy)
    probe = (
        "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('relayed.test', 80, "
        "socket.AF_INET)}))"
    )
    host, port = dns.address
    result = egress(
        "run", "--proxy", gate.url, "--dns", f"{host}:{port}", "--quiet", "--",
        sys.executable, "-I", "-c", probe,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['192.0.2.77']"
    assert dns.count("relayed.test") >= 1


def test_bad_evidence_flags_fail_closed(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, _, _ = world
    marker = tmp_path / "ran"
    result = egress("run", "--policy", str(policy), "--audit-required", "--", "touch", str(marker))
    assert result.returncode == 125
    assert "--journal" in result.stderr and "was not run" in result.stderr
    assert not marker.exists()


def test_a_decision_log_that_cannot_be_written_stops_the_run_before_it_starts(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The evidence files are created before the sandbox: one that cannot be is a set-up failure
    (exit 125, the command not run), not a gate that fails after its command has started."""
    policy, _, _ = world
    marker, blocker = tmp_path / "ran", tmp_path / "a-file"
    blocker.write_text("")
    result = egress(
        "run", "--policy", str(policy), "--decision-log", str(blocker / "d.jsonl"),
        "--", "touch", str(marker),
    )  # fmt: skip
    assert result.returncode == 125
    assert str(blocker) in result.stderr and "was not run" in result.stderr
    assert not marker.exists()


def test_a_killed_launcher_takes_the_sandbox_with_it(world: tuple[Path, FakeDns, Upstream]) -> None:
    """SIGKILL gives the launcher no chance to clean up: the kernel must (PDEATHSIG chain, then the
    PID namespace)."""
    from tests.proxy.sandbox.conftest import processes_in_netns

    policy, _, _ = world
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--quiet", "--",
         "sh", "-c", "readlink /proc/self/ns/net; sleep 300 & sleep 300"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        inode = int(line.strip().split("[")[1].rstrip("]"))
        assert len(processes_in_netns(inode)) >= 3  # init, sh, two sleeps
        proc.kill()
        proc.wait(WAIT)
        deadline = time.monotonic() + 10
        while processes_in_netns(inode) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_in_netns(inode) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_private_gates_host_port_is_not_attributed_to_the_sandbox(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The gate always has a host-loopback listener too; a local process using it is not the
    sandbox, so its decisions must not carry the sandbox's id."""
    policy, dns, upstream = world
    log = tmp_path / "decisions.jsonl"
    port_file = tmp_path / "gate-port"

    # The library's hooks expose the gate's host port; a thread uses it from the host while the
    # sandbox runs (the hooks run on the gate's event loop, which must not block).
    import threading
    import urllib.request

    from proxy.app.private_gate import start_private_gate
    from proxy.sandbox.launcher import RunOptions, run

    done = tmp_path / "done"
    statuses: list[int] = []

    def on_gate(gate: object) -> None:
        port_file.write_text(str(gate.listen_address[1]))  # type: ignore[attr-defined]

    def from_host() -> None:
        try:
            proxy = {"http": f"http://127.0.0.1:{port_file.read_text()}"}
            opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxy))
            url = f"http://allowed.test:{upstream.port}/from-host"
            with opener.open(url, timeout=10) as response:
                statuses.append(response.status)
        finally:
            done.touch()

    waiter = f"i=0; while [ ! -e {done} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"
    code = run(
        RunOptions(
            argv=["sh", "-c", waiter], policy_path=policy, nameservers=[dns.nameserver],
            sandbox_id="sbx-own", quiet=True, decision_log=str(log), on_gate=on_gate,
            gate=start_private_gate, on_ready=lambda _s: threading.Thread(target=from_host, daemon=True).start(),
        )
    )  # fmt: skip
    assert statuses == [200]
    assert code == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "egress.decision"]
    assert [d.get("path") for d in decisions] == ["/from-host"]
    assert "sandbox_id" not in decisions[0]


def test_shared_gate_identifies_the_sandbox_by_its_credential(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """`egress serve --sandboxes`: the launcher carries the credential from --proxy into the tools'
    proxy URL; without it (or with another sandbox's id) the gate refuses with 407."""
    import threading

    from proxy.policy.identities import token_digest

    policy, dns, upstream = world
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text(
        f"version: 1\nsandboxes:\n  - id: sbx-cred\n    token_sha256: {token_digest('s3cret')}\n"
    )
    log = tmp_path / "decisions.jsonl"
    serve = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "serve", "--policy", str(policy), "--listen",
         "127.0.0.1:0", "--sandboxes", str(sandboxes), "--no-metrics", "--decision-log", str(log),
         "--nameserver", dns.nameserver],
        cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        assert serve.stderr is not None
        port = 0
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = serve.stderr.readline()
            if "gate ready" in line:
                port = int(line.split("listen=", 1)[1].split()[0].rsplit(":", 1)[1])
                break
            if not line:
                break
        assert port, "egress serve did not start"
        threading.Thread(target=serve.stderr.read, daemon=True).start()
        curl = f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}\\n' http://allowed.test:{upstream.port}/"
        good = egress("run", "--quiet", "--proxy", f"http://sbx-cred:s3cret@127.0.0.1:{port}",
                      "--", "sh", "-c", curl)  # fmt: skip
        anonymous = egress("run", "--quiet", "--proxy", f"http://127.0.0.1:{port}",
                           "--", "sh", "-c", curl)  # fmt: skip
        wrong = egress("run", "--quiet", "--proxy", f"http://sbx-cred:guess@127.0.0.1:{port}",
                       "--", "sh", "-c", curl)  # fmt: skip
    finally:
        terminate(serve)
    assert good.stdout.strip() == "200", good.stderr
    assert anonymous.stdout.strip() == "407"
    assert wrong.stdout.strip() == "407"
    decisions = [json.loads(x) for x in log.read_text().splitlines()]
    allowed = [
        d for d in decisions if d.get("event") == "egress.decision" and d["decision"] == "allow"
    ]
    assert [d.get("sandbox_id") for d in allowed] == ["sbx-cred"]


def test_a_library_caller_without_a_gate_or_with_a_bad_id_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The launcher as a library fails closed too: a private gate needs a starter, and an id is
    checked by the same rule as everywhere else (a trailing newline is not part of it)."""
    from proxy.app.private_gate import start_private_gate
    from proxy.sandbox.launcher import RunOptions, run

    marker = tmp_path / "ran"
    assert run(RunOptions(argv=["touch", str(marker)], quiet=True)) == 125
    bad_id = RunOptions(
        argv=["touch", str(marker)], sandbox_id="agent-7\n", gate=start_private_gate
    )
    assert run(bad_id) == 125
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "no gate to start" in err
    assert "'agent-7\\n' is not a sandbox id" in err
