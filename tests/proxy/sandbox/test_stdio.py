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


_INJECT = """
import fcntl, os, termios
try:
    fd = os.open("/dev/tty", os.O_RDWR)
except OSError as exc:
    print("NO-TTY", exc.errno, flush=True)
    raise SystemExit(0)
for name in ("TIOCSTI", "TIOCLINUX"):
    try:
        for ch in b"echo INJECTED\\n":
            fcntl.ioctl(fd, getattr(termios, name, 0x541C), bytes([ch]))
        print(name, "PUSHED", flush=True)
    except OSError as exc:
        print(name, "REFUSED", exc.errno, flush=True)
print("SIZE", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\\0" * 8) != b"", flush=True)
"""


@pytest.mark.netns
@pytest.mark.timeout(90)
@pytest.mark.parametrize("stdio", ["terminal", "redirected"])
def test_the_command_cannot_type_into_the_terminal_it_was_started_from(
    world: tuple[Path, FakeDns, Upstream], tmp_path: Path, stdio: str
) -> None:
    """The shell that ran ``egress run`` reads its terminal again once the run ends: input the
    command pushed into that terminal (TIOCSTI, TIOCLINUX) would run there, outside the sandbox, as
    if typed. The command's session keeps the terminal as its controlling terminal (``/dev/tty``
    opens it even when its standard streams are files), so the ioctls themselves are refused;
    other terminal ioctls still work."""
    import pty
    import select

    policy, _, _ = world
    script = tmp_path / "inject.py"
    script.write_text(_INJECT)
    log = tmp_path / "out.txt"
    egress_run = (
        f"{sys.executable} -m proxy.app.cli run --quiet --policy {policy} -- "
        f"{sys.executable} -I {script}"
    )
    if stdio == "redirected":
        egress_run += f" </dev/null >{log} 2>&1"
    shell = f"{egress_run}; echo EXIT=$?; stty -echo; read -r line; echo 'AFTER:['$line']'"
    pid, master = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve("/bin/sh", ["sh", "-c", shell], clean_env())
    output = b""
    try:
        deadline = time.monotonic() + WAIT
        while b"EXIT=" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                output += os.read(master, 4096)
        time.sleep(0.5)  # the shell is at its read: it would take what was pushed
        os.write(master, b"typed\n")
        deadline = time.monotonic() + WAIT
        while b"AFTER:" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                output += os.read(master, 4096)
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    text = output.decode(errors="replace") + (log.read_text() if log.exists() else "")
    assert "AFTER:[typed]" in text, text
    assert "INJECTED" not in text, text
    assert "TIOCSTI REFUSED 1" in text, text
    assert "TIOCLINUX REFUSED 1" in text, text
    assert "SIZE True" in text, text
    assert "EXIT=0" in text, text
    assert os.waitstatus_to_exitcode(status) == 0


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
