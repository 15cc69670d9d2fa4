"""``egress run --reuse-gate``: one gate per user, each run served with its own policy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.sandbox import usergate
from proxy.sandbox.gatedir import UserGateError, gate_dir, private_dir
from proxy.sandbox.usergate import wanted
from tests.harness import Upstream
from tests.usergate_support import UserGateWorld, alive, loopback_policy, wait_gone
from tests.usergate_support import world as make_world

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]
WAIT = 30.0


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


def _fetch(port: int, path: str) -> str:
    # --noproxy '': the sandbox's NO_PROXY names localhost; this request must go through the gate
    return (
        f"curl -sS -m 10 --noproxy '' -o /dev/null -w '%{{http_code}}\\n' "
        f"http://localhost:{port}/{path}"
    )


# -- the launcher's side, without a gate ---------------------------------------------------------


def test_the_directory_is_the_runtime_directory_or_a_per_uid_one_in_tmp() -> None:
    assert gate_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/agent-egress"
    uid = os.geteuid()
    assert gate_dir({"XDG_RUNTIME_DIR": "relative/dir"}) == f"/tmp/agent-egress-{uid}"
    assert gate_dir({}) == f"/tmp/agent-egress-{uid}"


def test_the_flag_or_the_environment_asks_for_it() -> None:
    assert wanted(True, {})
    assert wanted(False, {"EGRESS_REUSE_GATE": "1"})
    assert not wanted(False, {"EGRESS_REUSE_GATE": "0"})
    assert not wanted(False, {})


def test_the_directory_is_created_private(tmp_path: Path) -> None:
    made = private_dir(str(tmp_path / "d"))
    assert os.stat(made).st_mode & 0o777 == 0o700


def test_a_directory_others_can_enter_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(UserGateError, match="mode 755"):
        private_dir(str(loose))


def test_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UserGateError, match="not a directory"):
        private_dir(str(link))
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(UserGateError, match="not a directory"):
        private_dir(str(plain))


def test_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UserGateError, match="owned by uid 65534"):
        private_dir(str(theirs))


def test_the_run_line_decides_whether_a_shared_gate_can_serve_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.app.sandbox_cli import _reusable, run_parser

    for name in ("EGRESS_REUSE_GATE", "TRACEPARENT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)

    def reusable(*words: str) -> bool:
        return _reusable(run_parser().parse_args(["run", *words, "--", "true"]))

    assert reusable("--reuse-gate")
    assert reusable("--reuse-gate", "--policy", "p.yaml", "--summary", "json", "--quiet")
    assert not reusable()
    assert reusable("--reuse-gate", "--context", "task=t", "--sandbox-id", "sbx-1")
    for other in (
        ["--decision-log", "-"],
        ["--journal", "j"],
        ["--nameserver", "127.0.0.1"],
        ["--credentials", "c.yaml"],
        ["--state-dir", "/s"],
        ["--json"],
    ):
        assert not reusable("--reuse-gate", *other), other
    monkeypatch.setenv("EGRESS_REUSE_GATE", "1")
    assert reusable()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert not reusable()  # an evidence sink: the run's own gate exports it


# -- runs through one shared gate ----------------------------------------------------------------


def test_runs_share_one_gate_and_each_keeps_its_own_policy(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    port = http_upstream.port
    allowing = loopback_policy(write_policy, port)
    refusing = loopback_policy(write_policy, port, allow=False)

    first = world.run(
        "--reuse-gate", "--policy", str(allowing), "--", "sh", "-c", _fetch(port, "a")
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "200"
    assert "1 request(s) allowed, 0 refused" in first.stderr  # the run's own summary
    pid = world.gate_pid()
    assert pid is not None and alive(pid)
    accepted = http_upstream.accepted

    second = world.run(
        "--reuse-gate", "--policy", str(refusing), "--", "sh", "-c", _fetch(port, "b")
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "403"
    assert "0 request(s) allowed, 1 refused" in second.stderr
    assert f"refused localhost:{port}: no-matching-rule" in second.stderr
    assert http_upstream.accepted == accepted  # the refused request reached nothing
    assert [target for _m, target, _h in http_upstream.requests] == ["/a"]

    third = world.run(
        "--reuse-gate", "--summary", "json", "--policy", str(allowing), "--",
        "sh", "-c", _fetch(port, "c"),
    )  # fmt: skip
    assert third.returncode == 0, third.stderr
    summary = json.loads(third.stderr.strip().splitlines()[-1])
    assert summary["allowed"] == 1 and summary["refused"] == 0
    assert world.gate_pid() == pid  # every run went to the one gate


def test_the_command_sees_no_gate_socket_and_no_gate_state(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    policy = loopback_policy(write_policy, http_upstream.port)
    directory, state = world.directory, world.state
    script = (
        f"ls -A {directory} | wc -l; ls -A {state} 2>/dev/null | wc -l; "
        f"test -S {directory}/gate.sock && echo socket-visible || echo socket-hidden"
    )
    result = world.run("--reuse-gate", "--policy", str(policy), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "socket-hidden"]
    assert (directory / "gate.sock").is_socket()  # there all along, outside the sandbox


def test_a_broken_policy_stops_the_run_and_names_its_line(
    world: UserGateWorld, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    broken = write_policy("version: 1\nrules:\n  - name: x\n    hosts: [a.test]\n    bogus: 1\n")
    marker = tmp_path / "ran"
    result = world.run("--reuse-gate", "--policy", str(broken), "--", "touch", str(marker))
    assert result.returncode == 125
    assert f"{broken}:" in result.stderr and "bogus" in result.stderr
    assert "the command was not run" in result.stderr
    assert not marker.exists()


def test_a_fallback_answer_gets_the_run_its_own_gate_and_tells_the_shared_one_nothing(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    """What a gate answers for a policy it cannot serve (ask rules): the launcher builds the
    sandbox for a gate of its own, and the shared gate never sees its listeners."""
    port = http_upstream.port
    policy = loopback_policy(write_policy, port)
    private_dir(str(world.directory))
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(str(world.directory / "gate.sock"))
    fake.listen(4)
    heard: list[bytes] = []

    def answer() -> None:
        conn, _ = fake.accept()
        with conn:
            conn.settimeout(WAIT)
            heard.append(conn.recv(65536))
            conn.sendall(json.dumps({"ok": False, "fallback": "ask rules"}).encode())
            while more := conn.recv(65536):
                heard.append(more)

    listener = threading.Thread(target=answer, daemon=True)
    listener.start()
    try:
        result = world.run(
            "--reuse-gate", "--summary", "json", "--policy", str(policy), "--",
            "sh", "-c", _fetch(port, "x"),
        )  # fmt: skip
        listener.join(WAIT)
    finally:
        fake.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200"
    assert [json.loads(m).get("check", {}).get("path") for m in heard] == [str(policy)]
    assert not listener.is_alive()  # the launcher closed the connection after the answer


def test_the_gate_exits_when_idle_and_the_next_run_starts_another(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    policy = loopback_policy(write_policy, http_upstream.port)
    pid = usergate.start(str(private_dir(str(world.directory))), idle=1.0, environ=world.env())
    assert wait_gone(pid, 20.0)
    assert not (world.directory / "gate.sock").exists()
    result = world.run("--reuse-gate", "--policy", str(policy), "--", "true")
    assert result.returncode == 0, result.stderr
    successor = world.gate_pid()
    assert successor is not None and successor != pid and alive(successor)


def test_a_socket_served_by_another_user_is_never_handed_a_sandbox(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to listen as another user")
    port = http_upstream.port
    policy = loopback_policy(write_policy, port)
    private_dir(str(world.directory))
    path = str(world.directory / "gate.sock")
    # bound as us in our directory, then listening as nobody: SO_PEERCRED then says 65534
    planted = subprocess.Popen(
        [sys.executable, "-c", _PLANTED, path],
        stdout=subprocess.PIPE,
    )
    try:
        assert planted.stdout is not None
        assert planted.stdout.read(1) == b"L"
        result = world.run(
            "--reuse-gate", "--policy", str(policy), "--", "sh", "-c", _fetch(port, "z")
        )
        assert result.returncode == 0, result.stderr
        assert "runs as uid 65534" in result.stderr and "starts its own gate" in result.stderr
        assert result.stdout.strip() == "200"  # served by a private gate instead
        said = planted.stdout.read()  # to its end: it exits once the connection is done
        assert said.startswith(b"C") and b"M" not in said  # connected to, never told anything
    finally:
        planted.kill()
        planted.wait(10)


_PLANTED = """
import os, socket, sys
planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
planted.bind(sys.argv[1])
os.setgid(65534)
os.setuid(65534)
planted.listen(8)
out = sys.stdout.buffer
out.write(b"L"); out.flush()
planted.settimeout(20)
conn, _ = planted.accept()
out.write(b"C"); out.flush()
conn.settimeout(20)
out.write(b"M" if conn.recv(65536) else b"E"); out.flush()
"""


def test_the_shared_gate_names_each_runs_processes_and_holds_executable_rules(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    """Two runs at once, each attributed through its own sandbox (their loopback peers may be the
    same): curl's run is allowed by a rule bound to curl, python's run is refused by the same
    rule and reaches nothing."""
    port = http_upstream.port
    curl = os.path.realpath("/usr/bin/curl")
    policy = write_policy(
        f"""
        version: 1
        allow_internal: [127.0.0.0/8, "::1/128"]
        rules:
          - name: curl-only
            hosts: [localhost]
            ports: [{port}]
            executables: [{curl}]
        """
    )
    script = (  # a plain proxy request from python, straight to the gate's port in the sandbox
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n"
        f"s.sendall(b'GET http://localhost:{port}/py HTTP/1.1\\r\\nHost: localhost:{port}\\r\\n"
        "Connection: close\\r\\n\\r\\n')\n"
        "print(s.recv(100).split()[1].decode())\n"
    )
    before = http_upstream.accepted
    argv = [sys.executable, "-m", "proxy.app.cli", "run", "--reuse-gate", "--summary", "json"]
    warm = world.run("--reuse-gate", "--policy", str(policy), "--", "true")
    assert warm.returncode == 0, warm.stderr
    runs = [
        subprocess.Popen(
            [*argv, "--policy", str(policy), "--", *command],
            cwd=Path(__file__).resolve().parents[3],
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in (
            ["sh", "-c", _fetch(port, "curl") + "; sleep 0.3"],
            [sys.executable, "-c", script],
        )
    ]
    (curl_out, curl_err), (py_out, py_err) = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], (curl_err, py_err)
    assert curl_out.strip() == "200"
    assert py_out.strip() == "403"
    curl_summary = json.loads(curl_err.strip().splitlines()[-1])
    py_summary = json.loads(py_err.strip().splitlines()[-1])
    assert [p["exe"] for p in curl_summary["processes"]] == [curl]
    assert [p["exe"] for p in py_summary["processes"]] == [os.path.realpath(sys.executable)]
    assert py_summary["processes"][0]["reasons"] == {"executable-not-allowed": 1}
    assert [t for _m, t, _h in http_upstream.requests][-1:] == ["/curl"]
    assert http_upstream.accepted == before + 1  # python's request reached nothing


def test_a_bound_executable_is_read_only_inside_a_sandbox_the_shared_gate_serves(
    world: UserGateWorld, tmp_path: Path
) -> None:
    """The shared gate named the file in its answer to the check; the sandbox, running as the
    file's owner, cannot rewrite or replace it."""
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir(mode=0o755)
    tool.write_text("#!/bin/sh\necho genuine\n")
    tool.chmod(0o755)
    policy = tmp_path / "bound.yaml"
    policy.write_text(
        "version: 1\nrules:\n"
        f"  - {{name: tool-only, hosts: [allowed.test], executables: [{tool}]}}\n"
    )
    script = (
        f"echo 'echo forged' >> {tool}; echo \"append=$?\"; "
        f'mv {tool} {tool}.old; echo "rename=$?"; {tool}'
    )
    result = world.run("--reuse-gate", "--quiet", "--policy", str(policy), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert "append=0" not in result.stdout and "rename=0" not in result.stdout
    assert "genuine" in result.stdout and "forged" not in tool.read_text()
    assert world.gate_pid() is not None  # served by the shared gate, not a gate of its own


def test_a_socket_activated_gate_serves_and_leaves_the_socket_to_its_owner(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    """As systemd starts it: the listening socket is descriptor 3, named by LISTEN_PID and
    LISTEN_FDS. Runs are served through it, and at its idle exit the gate leaves the name (the
    socket is its owner's, who starts the gate again on the next connection)."""
    port = http_upstream.port
    policy = loopback_policy(write_policy, port)
    directory = private_dir(str(world.directory))
    path = os.path.join(directory, "gate.sock")
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        owner.bind(path)
    finally:
        os.umask(old)
    owner.listen(8)
    fd = owner.fileno()
    gate = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(fd),
         "-m", "proxy.app.user_gate", "--dir", directory, "--idle-exit", "2"],
        cwd=Path(__file__).resolve().parents[3], env=world.env(), pass_fds=(fd,),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        result = world.run(
            "--reuse-gate", "--policy", str(policy), "--", "sh", "-c", _fetch(port, "s")
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "200"
        assert "1 request(s) allowed" in result.stderr
        assert gate.wait(WAIT) == 0, gate.stderr.read() if gate.stderr else ""  # idled out
        assert os.path.exists(path)  # still the owner's, listening for the next start
    finally:
        if gate.poll() is None:
            gate.kill()
            gate.wait(WAIT)
        owner.close()


# What systemd does before it runs a socket-activated service: the socket as descriptor 3, and
# LISTEN_PID / LISTEN_FDS naming it for this very process (exec keeps the pid).
ACTIVATE = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def test_an_activated_socket_that_is_not_the_expected_one_is_refused(tmp_path: Path) -> None:
    from proxy.app.user_gate import activated_socket

    assert activated_socket("/x", {}) is None  # not activated
    with pytest.raises(ValueError, match="expected one socket"):
        activated_socket("/x", {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"})


def test_a_gate_activated_with_a_socket_elsewhere_does_not_start(world: UserGateWorld) -> None:
    elsewhere = private_dir(str(world.root / "elsewhere"))
    directory = private_dir(str(world.directory))
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(os.path.join(elsewhere, "gate.sock"))
    owner.listen(1)
    try:
        out = subprocess.run(
            [sys.executable, "-c", ACTIVATE, str(owner.fileno()),
             "-m", "proxy.app.user_gate", "--dir", directory],
            cwd=Path(__file__).resolve().parents[3], env=world.env(), pass_fds=(owner.fileno(),),
            capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
    finally:
        owner.close()
    assert out.returncode == 2
    assert "ListenStream" in out.stderr and "does not start" in out.stderr


def test_first_runs_at_once_start_one_gate(
    world: UserGateWorld, write_policy: Callable[[str], Path]
) -> None:
    policy = write_policy("version: 1\nrules: []\n")
    argv = [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--reuse-gate"]
    runs = [
        subprocess.Popen(
            [*argv, "--policy", str(policy), "--", "true"],
            cwd=Path(__file__).resolve().parents[3],
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [run.communicate(timeout=90) for run in runs]
    assert [run.returncode for run in runs] == [0] * 6, outputs
    assert all("starts its own gate" not in err for _out, err in outputs)
    log = (world.directory / "gate.log").read_text()
    assert log.count("per-user gate ready") == 1


def test_a_run_whose_policy_inspects_trusts_the_shared_gates_ca_and_cleans_up(
    world: UserGateWorld,
) -> None:
    """The default policy reads requests on some hosts: the sandbox gets a bundle of the system's
    CAs and the shared gate's own, written for this run and removed after it."""
    result = world.run(
        "--reuse-gate", "--quiet", "--", "sh", "-c", 'echo "$SSL_CERT_FILE"; cat "$SSL_CERT_FILE"'
    )
    assert result.returncode == 0, result.stderr
    bundle, _, content = result.stdout.partition("\n")
    gate_ca = (world.state / "mitmproxy" / "mitmproxy-ca-cert.pem").read_text()
    assert gate_ca.strip() in content
    assert content.count("BEGIN CERTIFICATE") > 1  # the system's CAs too
    assert not os.path.exists(bundle) and not os.path.exists(os.path.dirname(bundle))


def test_a_runs_decision_log_file_holds_its_own_decisions_with_process_and_context(
    world: UserGateWorld,
    write_policy: Callable[[str], Path],
    http_upstream: Upstream,
    tmp_path: Path,
) -> None:
    """--decision-log FILE on the shared gate: the launcher opens the file and hands it over; it
    gets this run's decisions and closing events only, stamped as a private gate stamps them."""
    port = http_upstream.port
    policy = loopback_policy(write_policy, port)
    mine, other = tmp_path / "mine.jsonl", tmp_path / "other.jsonl"
    first = world.run(
        "--reuse-gate", "--quiet", "--policy", str(policy), "--decision-log", str(mine),
        "--context", "task=t-1", "--sandbox-id", "sbx-logged", "--",
        "sh", "-c", _fetch(port, "one") + "; " + _fetch(port, "two"),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = world.run(
        "--reuse-gate", "--quiet", "--policy", str(policy), "--decision-log", str(other),
        "--", "sh", "-c", _fetch(port, "three"),
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    lines = [json.loads(line) for line in mine.read_text().splitlines()]
    decisions = [line for line in lines if "decision" in line]
    assert [d["path"] for d in decisions] == ["/one", "/two"]
    assert {d["sandbox_id"] for d in lines} == {"sbx-logged"}
    assert all(d["context"] == {"task": "t-1"} for d in decisions)
    assert all(d["exe"] == os.path.realpath("/usr/bin/curl") for d in decisions)
    assert any(line.get("event") == "egress.connection.closed" for line in lines)
    others = [json.loads(line) for line in other.read_text().splitlines()]
    assert [d["path"] for d in others if "decision" in d] == ["/three"]


def test_a_decision_log_on_stderr_gets_a_gate_of_its_own(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    port = http_upstream.port
    policy = loopback_policy(write_policy, port)
    result = world.run(
        "--reuse-gate", "--quiet", "--policy", str(policy), "--decision-log", "-", "--",
        "sh", "-c", _fetch(port, "err"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"path":"/err"' in result.stderr
    assert world.gate_pid() is None  # the shared gate was never asked
