"""What the command inherits from the launcher: its stdin, stdout and stderr, and the terminal."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import IO, Any

    Stdio = int | IO[Any] | None


def stdio_fds(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> list[int]:
    """The descriptors the command will get as stdin/stdout/stderr (pipes we create are ours)."""
    fds = []
    for default, given in enumerate((stdin, stdout, stderr)):
        if given is None:
            fds.append(default)
        elif isinstance(given, int):
            if given >= 0:  # subprocess.PIPE / DEVNULL are negative: made by us, harmless
                fds.append(given)
        else:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                fds.append(given.fileno())
    return fds


def stdio_problem(fds: Sequence[int] = (0, 1, 2)) -> str | None:
    """The command inherits our stdin/stdout/stderr. Those may be sockets (an agent harness, inetd),
    which keep the network namespace they were made in: a connected stream is only a channel to its
    peer, but an unconnected or datagram IP socket could send anywhere the host can. Refuse those."""
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                return f"fd {fd} is a {sock.type.name} IP socket, which could send past the sandbox"
            try:
                sock.getpeername()
            except OSError:
                return f"fd {fd} is an unconnected IP socket, which could reach past the sandbox"
    return None


def foreground_tty() -> int | None:
    """The terminal fd to give the command, if we run in the terminal's foreground process group."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            continue
    return None


def restore_tty(fd: int | None) -> None:
    """Take the terminal back from the command's (now empty) process group."""
    if fd is None:
        return
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, os.getpgrp())
    finally:
        signal.signal(signal.SIGTTOU, previous)
