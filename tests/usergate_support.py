"""A private runtime directory for ``egress run --reuse-gate`` tests, and the per-user gate in it
stopped by its pid afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness import clean_env

REPO = Path(__file__).resolve().parents[1]

# Inside the sandbox: a listener of its own, handed to the shared gate with an allow-all policy,
# then a request through it. Prints "attack=<what happened>".
ESCAPE = """
import json, socket, sys
path, policy, code, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
own = socket.create_server(("127.0.0.1", 0))
try:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
except OSError as exc:
    print("attack=" + type(exc).__name__)
    raise SystemExit(0)
message = {"version": 1, "sandbox_id": "sbx-evil", "listeners": ["proxy"],
           "policy": {"path": policy, "managed": None, "code": code}, "summary": None}
socket.send_fds(conn, [json.dumps(message).encode()], [own.fileno()])
reply = json.loads(conn.recv(65536) or b"{}")
if not reply.get("ok"):
    print("attack=refused")
    raise SystemExit(0)
client = socket.create_connection(own.getsockname(), timeout=10)
client.sendall(f"GET http://localhost:{port}/ HTTP/1.1\\r\\nHost: localhost:{port}\\r\\n\\r\\n".encode())
print("attack=" + client.recv(65536).split(b"\\r\\n", 1)[0].decode())
"""

WAIT = 30.0


def loopback_policy(write_policy: Callable[[str], Path], port: int, *, allow: bool = True) -> Path:
    """A policy allowing ``localhost:port`` (a loopback upstream; internal addresses opened for
    it), or, with ``allow=False``, allowing nothing on the same terms."""
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


class UserGateWorld:
    """``XDG_RUNTIME_DIR`` and the gate's state directory, both short-lived and short-named (a Unix
    socket's path has at most 107 bytes)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="eg-", dir="/tmp"))
        self.runtime = self.root / "run"
        self.runtime.mkdir(mode=0o700)
        self.state = self.root / "state"
        self.directory = self.runtime / "agent-egress"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            XDG_RUNTIME_DIR=str(self.runtime), EGRESS_STATE_DIR=str(self.state), **extra
        )

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = WAIT
    ) -> subprocess.CompletedProcess[str]:
        """``egress run ARGS`` (the caller gives --reuse-gate, or sets it in ``env``)."""
        return subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env if env is not None else self.env(),
        )

    def gate_pid(self) -> int | None:
        try:
            return int((self.directory / "gate.pid").read_text())
        except (OSError, ValueError):
            return None

    def gate_pids(self) -> set[int]:
        """Every gate serving this world's directory: the one in gate.pid and any other a failed
        test left (found by its command line in /proc, each stopped by its pid)."""
        found = {pid} if (pid := self.gate_pid()) is not None else set()
        needle = f"--dir\0{self.directory}\0".encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                        found.add(int(entry))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        for pid in self.gate_pids():
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
                if not wait_gone(pid, 10.0):
                    os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, 10.0)
        shutil.rmtree(self.root, ignore_errors=True)


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def world() -> Iterator[UserGateWorld]:
    made = UserGateWorld()
    try:
        yield made
    finally:
        made.stop()
