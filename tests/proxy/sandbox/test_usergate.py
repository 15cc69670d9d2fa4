"""``egress run --reuse-gate``: one gate per user, each run served with its own policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.sandbox import usergate
from proxy.sandbox.usergate import UserGateError, gate_dir, private_dir, wanted
from tests.harness import Upstream
from tests.usergate_support import UserGateWorld, alive, wait_gone
from tests.usergate_support import world as make_world

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


def _policy(write_policy: Callable[[str], Path], port: int, *, allow: bool = True) -> Path:
    rules = f"""
          - name: local-upstream
            hosts: [localhost]
            ports: [{port}]
    """
    return write_policy(
        f"""
        version: 1
        allow_internal: [127.0.0.0/8, "::1/128"]
        rules:{rules if allow else " []"}
        """
    )


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
    for other in (
        ["--decision-log", "-"],
        ["--journal", "j"],
        ["--context", "task=t"],
        ["--nameserver", "127.0.0.1"],
        ["--credentials", "c.yaml"],
        ["--state-dir", "/s"],
        ["--json"],
    ):
        assert not reusable("--reuse-gate", *other), other
    monkeypatch.setenv("EGRESS_REUSE_GATE", "1")
    assert reusable()
    monkeypatch.setenv("TRACEPARENT", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert not reusable()


# -- runs through one shared gate ----------------------------------------------------------------


def test_runs_share_one_gate_and_each_keeps_its_own_policy(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    port = http_upstream.port
    allowing = _policy(write_policy, port)
    refusing = _policy(write_policy, port, allow=False)

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
    policy = _policy(write_policy, http_upstream.port)
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


def test_a_policy_with_ask_rules_gets_its_own_gate(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    port = http_upstream.port
    policy = write_policy(
        f"""
        version: 1
        allow_internal: [127.0.0.0/8, "::1/128"]
        rules:
          - name: local-upstream
            hosts: [localhost]
            ports: [{port}]
          - name: ask-elsewhere
            action: ask
            hosts: [ask.test]
        """
    )
    result = world.run(
        "--reuse-gate", "--summary", "json", "--policy", str(policy), "--",
        "sh", "-c", _fetch(port, "x"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "200"
    # served by a gate of its own: only that one sees the sandbox's processes (a shared gate would
    # count the request as unattributed)
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert [p["exe"].rsplit("/", 1)[-1] for p in summary["processes"]] == ["curl"]


def test_the_gate_exits_when_idle_and_the_next_run_starts_another(
    world: UserGateWorld, write_policy: Callable[[str], Path], http_upstream: Upstream
) -> None:
    policy = _policy(write_policy, http_upstream.port)
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
    policy = _policy(write_policy, port)
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
