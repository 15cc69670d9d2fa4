"""The gate starts the way the image runs it, and enforces: the real ``egress serve`` as the image's
unprivileged user, with ``HOME`` unwritable and every mount read-only (a mount namespace this test
creates), writing only to a tmpfs state directory named by ``EGRESS_STATE_DIR``. It must serve an allowed
request and refuse another with zero connections at the refused upstream.

Needs root (to create the namespace and switch users), as in CI; it skips only where mount namespaces
cannot be created at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Upstream, terminate
from tests.prometheus_server import require_binary

ROOT = Path(__file__).resolve().parent.parent
EGRESS = Path(sys.executable).parent / "egress"
WAIT = 30.0


def image_user() -> int:
    match = re.search(
        r"^USER\s+(\d+)(?::\d+)?\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE
    )
    assert match, "the Dockerfile must switch to a numeric non-root USER"
    return int(match.group(1))


@pytest.fixture(scope="module")
def namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a mount namespace and switch to the image's user")
    require_binary("unshare")
    require_binary("setpriv")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are unavailable here: {probe.stderr.strip()}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """World-traversable (the gate's user must read the policy); pytest's tmp_path is root-only."""
    path = Path(tempfile.mkdtemp(prefix="egress-image-start-"))
    path.chmod(0o755)
    (path / "state").mkdir()
    (path / "hold").mkdir()
    yield path
    shutil.rmtree(path)


class ReadOnlyGate:
    def __init__(
        self, workdir: Path, policy: Path, uid: int, state: Path | None = None, wait: bool = True
    ) -> None:
        self.state = state or workdir / "state"
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "EGRESS_STATE_DIR": str(self.state),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }
        command = [
            sys.executable, "-m", "tests.readonly_root", "--uid", str(uid),
            "--state", str(workdir / "state"), "--hold", str(workdir / "hold"),
            "--reachable", str(ROOT), "--reachable", str(workdir),
            "--", str(EGRESS), "serve", "--policy", str(policy), "--listen", "127.0.0.1:0",
            "--metrics", "127.0.0.1:0", "--journal", str(self.state / "audit.jsonl"),
            "--nameserver", "127.0.0.1:9",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "--", *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.info: dict[str, str] = {}
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if wait and (not self.ready.wait(WAIT) or not self.info):
            self.stop()
            raise AssertionError("the gate did not become ready:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "gate ready" in line:
                parts = line.split("gate ready", 1)[1].split()
                self.info = dict(p.split("=", 1) for p in parts if "=" in p)
                self.ready.set()
        self.ready.set()  # exited

    @property
    def proxy(self) -> str:
        return f"http://{self.info['listen']}"

    def inside(self, path: Path) -> Path:
        """``path`` as the gate sees it, in its own mount namespace."""
        return Path(f"/proc/{self.proc.pid}/root") / path.relative_to("/")

    def stop(self) -> int:
        return terminate(self.proc)


def curl_status(proxy: str, url: str, what: str = "%{http_code}") -> str:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", proxy, "-o", "/dev/null", "-w", what, url],
        capture_output=True, text=True, timeout=20, env=env, check=False,
    )  # fmt: skip
    return proc.stdout


def test_gate_starts_unprivileged_on_a_read_only_root_and_enforces(
    namespaces: None, workdir: Path
) -> None:
    allowed, refused = Upstream("allowed"), Upstream("refused")
    policy = workdir / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.1/32]\nrules:\n"
        f"  - name: local\n    cidrs: [127.0.0.1/32]\n    ports: [{allowed.port}]\n"
    )
    policy.chmod(0o644)
    uid = image_user()
    gate = ReadOnlyGate(workdir, policy, uid)
    try:
        status = Path(f"/proc/{gate.proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.MULTILINE)
        assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE)
        assert gate.info["state"] == str(gate.state)

        assert curl_status(gate.proxy, f"http://127.0.0.1:{allowed.port}/ok") == "200"
        assert [target for _, target, _ in allowed.requests] == ["/ok"]
        assert curl_status(gate.proxy, f"http://127.0.0.1:{refused.port}/no") == "403"
        tunnel = f"https://127.0.0.1:{refused.port}/tunnel"
        assert curl_status(gate.proxy, tunnel, "%{http_connect}") == "403"
        assert refused.accepted == 0

        confdir = gate.inside(gate.state / "mitmproxy")
        assert (confdir / "mitmproxy-ca.pem").is_file()
        assert (confdir.stat().st_mode & 0o777) == 0o700
        assert not (ROOT / "nonexistent").exists()
    finally:
        journal = gate.inside(gate.state / "audit.jsonl")
        records = journal.read_text().splitlines() if journal.exists() else []
        code = gate.stop()
        allowed.stop()
        refused.stop()
    assert code == 0, "".join(gate.lines)
    decisions = [r for r in map(json.loads, records) if r["event"] == "egress.decision"]
    assert [(d["decision"], d["kind"], d["port"]) for d in decisions] == [
        ("allow", "http", allowed.port),
        ("deny", "http", refused.port),
        ("deny", "connect", refused.port),
    ], records
    # The namespace is gone with the gate: nothing was written to the host's directory.
    assert list((workdir / "state").iterdir()) == []


def test_a_read_only_state_dir_stops_start_up_with_its_name(
    namespaces: None, workdir: Path
) -> None:
    policy = workdir / "policy.yaml"
    policy.write_text("version: 1\nrules: []\n")
    policy.chmod(0o644)
    unwritable = workdir / "hold" / "egress"  # on the read-only tree inside the namespace
    gate = ReadOnlyGate(workdir, policy, image_user(), state=unwritable, wait=False)
    try:
        code = gate.proc.wait(WAIT)
    finally:
        gate.stop()
    gate.ready.wait(5)
    assert code == 2, "".join(gate.lines)
    assert f"error: state directory {unwritable}: Read-only file system" in "".join(gate.lines)
    assert not gate.info, "the gate must not listen without its state directory"


def test_a_state_dir_that_is_a_file_stops_start_up_with_its_name(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    proc = subprocess.run(
        [str(EGRESS), "serve", "--listen", "127.0.0.1:0", "--no-metrics",
         "--state-dir", str(blocked / "state")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"state directory {blocked / 'state'}: Not a directory" in proc.stderr
