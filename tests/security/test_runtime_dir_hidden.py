"""The user's runtime directory is hidden in every sandbox (threats 9 and 10).

``$XDG_RUNTIME_DIR`` holds the sockets of the user's own services by path: the systemd user manager
and the D-Bus session bus (``systemd-run --user CMD`` runs CMD outside any sandbox, with the host's
network), the SSH, GPG and keyring agents. A sandboxed command runs as the same user, so a socket
there would be a way out. A counting Unix socket server stands for such a service.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.sandbox.gatedir import runtime_dir
from tests.usergate_support import UserGateWorld
from tests.usergate_support import world as make_world


class CountingUnixServer:
    """A Unix socket server that counts the connections it accepts."""

    def __init__(self, path: Path) -> None:
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
def test_the_users_service_sockets_are_out_of_reach(world: UserGateWorld, reuse: bool) -> None:
    bus = world.runtime / "bus"
    server = CountingUnixServer(bus)
    try:
        probe = (
            "import os, socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({str(bus)!r}); print('connected')\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno)\n"
            "print('XDG_RUNTIME_DIR' in os.environ, 'DBUS_SESSION_BUS_ADDRESS' in os.environ)\n"
        )
        env = world.env(DBUS_SESSION_BUS_ADDRESS=f"unix:path={bus}")
        flags = ["--reuse-gate"] if reuse else []
        result = world.run(*flags, "--quiet", "--", "python3", "-I", "-c", probe, env=env)
        assert result.returncode == 0, result.stderr
        assert "connected" not in result.stdout and "refused" in result.stdout, result.stdout
        assert "False False" in result.stdout, result.stdout
        assert server.accepted == 0
        with socket.socket(socket.AF_UNIX) as control:  # from outside the sandbox it answers
            control.connect(str(bus))
        assert (world.gate_pid() is not None) == reuse, result.stderr
    finally:
        server.stop()
    assert server.accepted == 1


def test_a_runtime_directory_others_may_enter_is_not_hidden(tmp_path: Path) -> None:
    """Only a directory as the XDG specification makes it (this user's, mode 0700) is hidden: a
    shared one (``XDG_RUNTIME_DIR=/tmp`` in some containers) would hide what the command needs."""
    own = tmp_path / "run"
    own.mkdir(mode=0o700)
    assert runtime_dir({"XDG_RUNTIME_DIR": str(own)}) == os.path.realpath(own)
    own.chmod(0o755)
    assert runtime_dir({"XDG_RUNTIME_DIR": str(own)}) is None
    assert runtime_dir({"XDG_RUNTIME_DIR": "/tmp"}) is None
    assert runtime_dir({"XDG_RUNTIME_DIR": "relative"}) is None
    if not os.path.exists(f"/run/user/{os.geteuid()}"):  # the fallback where the variable is unset
        assert runtime_dir({}) is None
