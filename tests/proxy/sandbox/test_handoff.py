"""Handing a sandbox's listeners to a gate in another process over a Unix socket (no relay)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.sandbox.handoff import (
    HandoffError,
    HandoffServer,
    check_listener,
    gate_attacher,
    hand_off,
)
from proxy.sandbox.namespace import Listener, Sandbox, SandboxSpec
from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream, clean_env, recv_head

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[3]
WAIT = 30.0


class Handoff:
    """A HandoffServer running on a RunningGate's own event loop."""

    def __init__(self, gate: RunningGate, path: Path, **kwargs: Any) -> None:
        assert gate._loop is not None
        self.loop = gate._loop
        self.server = HandoffServer(str(path), gate_attacher(gate.gate), **kwargs)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(WAIT)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(WAIT)


@pytest.fixture
def world(
    write_policy: Callable[[str], Path],
    fake_dns: FakeDns,
    http_upstream: Upstream,
    start_gate: Callable[..., RunningGate],
    tmp_path: Path,
) -> Iterator[tuple[RunningGate, Path, Upstream]]:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("evil.test", "A", ["127.0.0.1"])
    policy = write_policy(
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: test-allowed
            hosts: [allowed.test]
            ports: [{http_upstream.port}]
        """
    )
    yield start_gate(policy), tmp_path / "gate.sock", http_upstream


def _run(sock: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--gate-socket", str(sock), *args],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, env=clean_env(**env),
    )  # fmt: skip


def test_the_gate_serves_the_sandbox_listener_itself(
    world: tuple[RunningGate, Path, Upstream],
) -> None:
    gate, path, upstream = world
    handoff = Handoff(gate, path)
    try:
        assert (path.stat().st_mode & 0o777) == 0o600
        script = (
            f"curl -sS -m 10 http://allowed.test:{upstream.port}/handed; echo allowed=$?; "
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}\\n' http://evil.test:{upstream.port}/; "
            f"curl -sS -m 5 --noproxy '*' http://127.0.0.1:{gate.port}/; echo direct=$?; "
            f"env | grep -c EGRESS_SANDBOX_TOKEN"
        )
        result = _run(path, "--sandbox-id", "sbx-handed", "--", "sh", "-c", script,
                      EGRESS_SANDBOX_TOKEN="not-for-the-sandbox")  # fmt: skip
        assert result.returncode == 1, result.stderr  # grep -c found no token inside
        assert "hello from http-upstream: GET /handed" in result.stdout
        assert "403" in result.stdout and "direct=7" in result.stdout
        assert "served by the gate at" in result.stderr
        decisions = [d for d in gate.decisions if d.kind in ("http", "connect")]
        assert {d.sandbox_id for d in decisions} == {"sbx-handed"}
        assert [d.host for d in decisions if not d.allowed] == ["evil.test"]
        deadline = time.monotonic() + 10
        while handoff.server.attached and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handoff.server.attached == {}  # detached when the sandbox ended
    finally:
        handoff.close()
    assert not path.exists()


def test_a_uid_that_is_not_allowed_is_refused_and_nothing_runs(
    world: tuple[RunningGate, Path, Upstream], tmp_path: Path
) -> None:
    gate, path, _ = world
    handoff = Handoff(gate, path, allowed_uids={123456})
    marker = tmp_path / "ran"
    try:
        result = _run(path, "--", "touch", str(marker))
    finally:
        handoff.close()
    assert result.returncode == 125
    assert "may not hand sandboxes to this gate" in result.stderr
    assert not marker.exists()


def test_a_required_credential_is_checked(
    world: tuple[RunningGate, Path, Upstream], tmp_path: Path
) -> None:
    gate, path, _ = world
    handoff = Handoff(gate, path, authenticate=lambda sid, token: sid if token == "right" else None)
    marker = tmp_path / "ran"
    try:
        wrong = _run(path, "--sandbox-id", "sbx-a", "--", "touch", str(marker),
                     EGRESS_SANDBOX_TOKEN="wrong")  # fmt: skip
        assert wrong.returncode == 125 and "wrong credential" in wrong.stderr
        assert not marker.exists()
        right = _run(path, "--sandbox-id", "sbx-a", "--quiet", "--", "touch", str(marker),
                     EGRESS_SANDBOX_TOKEN="right")  # fmt: skip
        assert right.returncode == 0, right.stderr
        assert marker.exists()
    finally:
        handoff.close()


def test_a_host_namespace_listener_is_refused(world: tuple[RunningGate, Path, Upstream]) -> None:
    """Only sandbox listeners: a socket in the gate's own namespace would serve the whole host."""
    gate, path, _ = world
    handoff = Handoff(gate, path)
    host_listener = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(HandoffError, match="gate's own network namespace"):
            hand_off(str(path), "sbx-x", {"proxy": host_listener})
        assert handoff.server.attached == {}
    finally:
        host_listener.close()
        handoff.close()


def test_a_malformed_sandbox_id_is_refused(world: tuple[RunningGate, Path, Upstream]) -> None:
    """The claimed id is checked before anything else about the hand-off; a trailing newline is
    not part of a valid id (``$`` would have let it through)."""
    gate, path, _ = world
    handoff = Handoff(gate, path)
    host_listener = socket.create_server(("127.0.0.1", 0))
    try:
        for bad in ("agent-7\n", "a b", "", "-x", "x" * 65):
            with pytest.raises(HandoffError, match="invalid sandbox id"):
                hand_off(str(path), bad, {"proxy": host_listener})
        # The same request with a valid id gets past the id check (and fails on the listener).
        with pytest.raises(HandoffError, match="gate's own network namespace"):
            hand_off(str(path), "agent-7", {"proxy": host_listener})
        assert handoff.server.attached == {}
    finally:
        host_listener.close()
        handoff.close()


def test_check_listener_rejects_wrong_kinds() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unbound = socket.socket()
    try:
        with pytest.raises(HandoffError, match="wrong socket type"):
            check_listener(udp, "proxy", 0)
        with pytest.raises(HandoffError, match="unknown listener"):
            check_listener(udp, "admin", 0)
        with pytest.raises(HandoffError, match="not listening"):
            unbound.bind(("127.0.0.1", 0))
            check_listener(unbound, "proxy", 0)
    finally:
        udp.close()
        unbound.close()


def test_no_gate_socket_fails_closed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = _run(tmp_path / "missing.sock", "--", "touch", str(marker))
    assert result.returncode == 125
    assert "cannot hand the sandbox to the gate" in result.stderr
    assert not marker.exists()


def test_identities_authenticator_uses_the_gate_credentials(tmp_path: Path) -> None:
    from proxy.policy.identities import Identities, token_digest
    from proxy.sandbox.handoff import identities_authenticator

    path = tmp_path / "sandboxes.yaml"
    path.write_text(
        "version: 1\nsandboxes:\n"
        f"  - id: sbx-a\n    token_sha256: {token_digest('tok-a')}\n"
        f"  - id: sbx-b\n    token_sha256: {token_digest('tok-b')}\n"
    )
    check = identities_authenticator(Identities.load(path))
    assert check("sbx-a", "tok-a") == "sbx-a"
    assert check("sbx-a", "tok-b") is None  # b's token does not prove a
    assert check("sbx-c", "tok-a") is None
    assert check("sbx-a", None) is None


def test_a_request_that_comes_late_is_read_and_one_that_never_comes_is_refused(
    world: tuple[RunningGate, Path, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate reads the launcher's message on its loop: whether it arrives with the connection
    or after a pause, and it gives up (refusing) on a client that connects and says nothing."""
    import json

    from proxy.sandbox import handoff as module

    monkeypatch.setattr(module, "REQUEST_TIMEOUT", 1.0)
    gate, path, _ = world
    handoff = Handoff(gate, path)
    try:
        with socket.socket(socket.AF_UNIX) as silent:
            silent.settimeout(WAIT)
            silent.connect(str(path))
            assert json.loads(silent.recv(module.MAX_MESSAGE)) == {
                "ok": False,
                "error": "no request within 1 s",
            }
        # A late message is read whenever it comes within the deadline: a long one here, so a
        # test process held up on a loaded machine cannot turn late into never.
        monkeypatch.setattr(module, "REQUEST_TIMEOUT", WAIT)
        with socket.socket(socket.AF_UNIX) as late:
            late.settimeout(2 * WAIT)
            late.connect(str(path))
            time.sleep(0.3)  # the gate is waiting for the message now
            late.sendall(json.dumps({"version": 1, "sandbox_id": "a b", "listeners": []}).encode())
            reply = json.loads(late.recv(module.MAX_MESSAGE))
            assert reply == {"ok": False, "error": "the listeners do not match their names"}
        assert handoff.server.attached == {}
    finally:
        handoff.close()


def test_a_check_message_is_answered_once_and_only_by_a_gate_that_takes_it(
    world: tuple[RunningGate, Path, Upstream], tmp_path: Path
) -> None:
    """The per-user gate's check comes before the hand-off on the same connection: a gate without
    a check refuses it, and a second check on one connection is refused."""
    import json

    from proxy.sandbox import handoff as module

    gate, path, _ = world

    def ask(conn: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
        conn.sendall(json.dumps(message).encode())
        answer: dict[str, Any] = json.loads(conn.recv(module.MAX_MESSAGE))
        return answer

    plain = Handoff(gate, path)
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(WAIT)
            conn.connect(str(path))
            assert ask(conn, {"version": 1, "check": {}}) == {
                "ok": False,
                "error": "this gate takes no check message",
            }
    finally:
        plain.close()
    checking = Handoff(gate, path, check=lambda body: {"ok": True, "echo": body})
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(WAIT)
            conn.connect(str(path))
            assert ask(conn, {"version": 1, "check": {"x": 1}}) == {"ok": True, "echo": {"x": 1}}
            assert ask(conn, {"version": 1, "check": {"x": 2}}) == {
                "ok": False,
                "error": "one check message per connection",
            }
        with socket.socket(socket.AF_UNIX) as conn:  # checked, then gone: nothing is attached
            conn.settimeout(WAIT)
            conn.connect(str(path))
            assert ask(conn, {"version": 1, "check": {}})["ok"] is True
        deadline = time.monotonic() + 10
        while checking.server.serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checking.server.serving == 0 and checking.server.attached == {}
    finally:
        checking.close()


def test_a_connection_whose_process_has_exited_is_from_nowhere(tmp_path: Path) -> None:
    """A process connects, passes the connection on and exits: where it ran can no longer be told,
    and its pid may be another process's by now (the gate must not ask that one)."""
    import multiprocessing

    from proxy.attribution.peer import peer_netns

    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    ours, theirs = socket.socketpair()

    def connect_and_pass_on() -> None:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
        socket.send_fds(theirs, [b"x"], [conn.fileno()])
        theirs.recv(1)  # exits once told to

    child = multiprocessing.get_context("fork").Process(target=connect_and_pass_on)
    child.start()
    accepted, _ = server.accept()
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    assert peer_netns(accepted) == os.stat("/proc/self/ns/net").st_ino  # while it runs
    ours.sendall(b"x")
    child.join(30)
    try:
        with pytest.raises(OSError):
            peer_netns(accepted)
    finally:
        for fd in fds:
            os.close(fd)
        for sock in (accepted, server, ours, theirs):
            sock.close()


def test_a_launcher_that_writes_without_end_does_not_hold_the_gate(
    world: tuple[RunningGate, Path, Upstream],
) -> None:
    """After its hand-off the gate reads the launcher's connection until EOF, ignoring what comes.
    On the asyncio loop (this gate's) ``sock_recv`` does not wait while bytes keep coming: without
    a turn between reads, a launcher writing without end held every client of the gate."""
    gate, path, _ = world
    handoff = Handoff(gate, path)
    spec = SandboxSpec(
        argv=["sleep", "60"],
        env={"PATH": "/usr/bin:/bin"},
        listeners=[Listener("proxy", "tcp", 3128)],
    )
    sandbox = Sandbox.spawn(spec)
    stop = threading.Event()
    chatter: threading.Thread | None = None
    conn: socket.socket | None = None
    try:
        conn, taken = hand_off(str(path), "sbx-chatty", {"proxy": sandbox.sockets["proxy"]})
        assert taken == ["proxy"]
        talking = conn

        def chat() -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    talking.sendall(b"x" * 65536)

        chatter = threading.Thread(target=chat, daemon=True)
        chatter.start()
        time.sleep(0.3)  # the gate is reading it now
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT / 3) as client:
            client.sendall(b"CONNECT 10.9.9.9:443 HTTP/1.1\r\nHost: 10.9.9.9:443\r\n\r\n")
            assert recv_head(client).startswith(b"HTTP/1.1 403")
        assert chatter.is_alive()  # answered while the launcher was still writing
    finally:
        stop.set()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        if chatter is not None:
            chatter.join(WAIT)
        sandbox.kill()
        sandbox.close_sockets()
        handoff.close()
