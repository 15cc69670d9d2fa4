"""What the command inherits: an IP socket as stdio that could send past the sandbox is refused, and
under a terminal the command gets it (and Ctrl-C) while `egress run` takes it back at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.sandbox.stdio import stdio_fds, stdio_problem
from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO, egress

WAIT = EGRESS_WAIT


def test_stdio_fds_checked_are_the_commands() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, open(os.devnull) as null:
        fds = stdio_fds(null, subprocess.PIPE, udp.fileno())
        assert fds == [null.fileno(), udp.fileno()]
        assert (
            stdio_problem(fds)
            == f"fd {udp.fileno()} is a SOCK_DGRAM IP socket, which could send past the sandbox"
        )
    assert stdio_fds(None, None, subprocess.DEVNULL) == [0, 1]


def test_an_unconnected_stream_socket_is_refused_a_connected_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as unconnected:
        assert stdio_problem([unconnected.fileno()]) == (
            f"fd {unconnected.fileno()} is an unconnected IP socket, which could reach past the "
            "sandbox"
        )
        with socket.create_connection(server.getsockname()) as connected:
            assert stdio_problem([connected.fileno()]) is None


def test_unix_sockets_and_files_are_not_ip_sockets() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right, open(os.devnull) as null:
        assert stdio_problem([left.fileno(), null.fileno()]) is None


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_terminal_is_passed_through_and_ctrl_c_reaches_only_the_command(
    world: tuple[Path, FakeDns, Upstream],
) -> None:
    """Under a terminal the command is the foreground process group: it reads the terminal, and
    Ctrl-C reaches it exactly once (the launcher is not in that group, so it forwards nothing)."""
    import pty
    import select

    policy, _, _ = world
    script = (
        "n=0; trap 'n=$((n+1))' INT; tty; echo READY; read x; echo GOT:$x; "
        "i=0; while [ $i -lt 30 ]; do sleep 0.05; i=$((i+1)); done; exit $((40+n))"
    )
    pid, master = pty.fork()
    if pid == 0:  # the child: a session leader whose controlling terminal is the pty
        os.chdir(REPO)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--", "sh", "-c", script],
            clean_env(),
        )  # fmt: skip
    output = b""

    def read_until(token: bytes, timeout: float = WAIT) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while token not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                output += chunk

    try:
        read_until(b"READY")
        assert b"/dev/pts/" in output  # the command has a terminal
        os.write(master, b"hello\n")
        read_until(b"GOT:hello")
        time.sleep(0.2)
        os.write(master, b"\x03")  # Ctrl-C
        read_until(b"egress: sandbox")  # the launcher got the terminal back and printed its summary
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 41, output.decode(errors="replace")
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_stdio_ip_socket_that_could_send_anywhere_is_refused(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    import socket

    policy, _, _ = world
    marker = tmp_path / "ran"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        result = egress("run", "--policy", str(policy), "--", "touch", str(marker), stdin=udp)
    assert result.returncode == 125
    assert "fd 0 is a SOCK_DGRAM IP socket" in result.stderr
    assert not marker.exists()
    a, b = socket.socketpair()  # a connected local stream (an agent harness) is fine
    with a, b:
        result = egress("run", "--policy", str(policy), "--quiet", "--", "true", stdin=a)
    assert result.returncode == 0, result.stderr
