"""A command cannot put a state directory of its own where the gate keeps its state (threats 17, 20).

The gate's state directory (its CA key, the approved rules it reads while the run goes on, the
approvals token and the context channel it writes) is hidden in every sandbox by a mount on it.
A mount point cannot be renamed, but the directory above it could be, mount and all: the command
could then make a new state directory at the old path and write an ``approved.yaml`` in it that
grants its own ask rule, with nobody asked, in this run and every later one. Every directory above
a hidden path is pinned (bound onto itself) as it is above a read-only one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Upstream, clean_env
from tests.usergate_support import REPO, UserGateWorld
from tests.usergate_support import world as make_world

PLANTED = (
    "version: 1\\nrules:\\n  - {{name: approved-0123456789abcdef, hosts: [ask.test], "
    "ports: [{port}]}}\\n"
)
CONNECT = (
    "import socket; s = socket.create_connection(('127.0.0.1', 3128)); "
    "s.sendall(b'CONNECT ask.test:{port} HTTP/1.1\\r\\nHost: ask.test:{port}\\r\\n\\r\\n'); "
    "print('answer=' + s.recv(100).split(b' ')[1].decode())"
)


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


def _asking(write_policy: Callable[[str], Path], port: int, tmp_path: Path) -> tuple[Path, Path]:
    """A policy whose one rule asks (for 1 s) about ask.test on ``port``, and a hosts file
    naming it on loopback."""
    policy = write_policy(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - {{name: asked, hosts: [ask.test], ports: [{port}], action: ask, timeout: 1}}\n"
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 ask.test\n")
    return policy, hosts


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_command_cannot_move_the_state_directory_aside_and_approve_its_own_ask(
    world: UserGateWorld,
    write_policy: Callable[[str], Path],
    http_upstream: Upstream,
    tmp_path: Path,
) -> None:
    port = http_upstream.port
    policy, hosts = _asking(write_policy, port, tmp_path)
    log = tmp_path / "decisions.jsonl"
    state, above = world.state, world.state.parent
    steps = "; ".join(
        [
            f'mv {above} {above}.moved; echo "movedir=$?"',
            f"mkdir -p {state}",
            f"printf '{PLANTED.format(port=port)}' > {state}/approved.yaml; echo \"plant=$?\"",
            f'python3 -I -c "{CONNECT.format(port=port)}"',
        ]
    )
    result = world.run(
        "--quiet", "--policy", str(policy), "--hosts-file", str(hosts),
        "--decision-log", str(log), "--", "sh", "-c", steps,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "movedir=" in result.stdout and "movedir=0" not in result.stdout, result.stdout
    assert "plant=" in result.stdout and "plant=0" not in result.stdout, result.stdout
    assert "answer=403" in result.stdout, result.stdout
    decided = [json.loads(line) for line in log.read_text().splitlines()]
    final = [r for r in decided if r.get("host") == "ask.test" and r["decision"] != "ask"]
    assert [(r["decision"], r["reason"]) for r in final] == [("deny", "approval-timeout")]
    assert http_upstream.accepted == 0
    assert not Path(f"{above}.moved").exists()
    assert not (state / "approved.yaml").exists()


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_link_on_the_way_to_the_state_directory_cannot_be_replaced_to_approve_an_ask(
    write_policy: Callable[[str], Path], http_upstream: Upstream, tmp_path: Path
) -> None:
    """`--state-dir LINK/state` with LINK a symbolic link: the directories above the real state
    directory are pinned, but the link is an entry the command may replace with a directory of its
    own. The run's files are resolved once, before the sandbox exists, so its gate (which finishes
    its start after the command has started) reads approvals from the real directory only."""
    port = http_upstream.port
    policy, hosts = _asking(write_policy, port, tmp_path)
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    state, log = link / "state", tmp_path / "decisions.jsonl"
    steps = "; ".join(
        [
            f'rm {link}; mkdir -p {state}; echo "replaced=$?"',
            f"printf '{PLANTED.format(port=port)}' > {state}/approved.yaml",
            f'python3 -I -c "{CONNECT.format(port=port)}"',
        ]
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
         "--hosts-file", str(hosts), "--state-dir", str(state), "--decision-log", str(log),
         "--", "sh", "-c", steps],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "replaced=0" in result.stdout  # the command did replace the link: the gate ignored it
    assert "answer=403" in result.stdout, result.stdout
    decided = [json.loads(line) for line in log.read_text().splitlines()]
    final = [r for r in decided if r.get("host") == "ask.test" and r["decision"] != "ask"]
    assert [(r["decision"], r["reason"]) for r in final] == [("deny", "approval-timeout")]
    assert http_upstream.accepted == 0


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_link_on_the_way_to_the_decision_log_cannot_be_replaced_to_redirect_it(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--decision-log LINK/d.jsonl`: the command replaces LINK with a directory holding a link
    to a file of its choosing; the gate, which opens the log after the command has started,
    writes to the real log all the same."""
    policy = write_policy("version: 1\nrules:\n  - {name: a, hosts: [a.test]}\n")
    real, link, victim = tmp_path / "real", tmp_path / "logs", tmp_path / "victim"
    real.mkdir()
    link.symlink_to(real)
    victim.write_text("untouched\n")
    log = link / "d.jsonl"
    probe = (
        "import socket; s = socket.create_connection(('127.0.0.1', 3128)); "
        "s.sendall(b'GET http://evil.test/x HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n'); s.recv(10)"
    )
    steps = f'rm {link}; mkdir {link}; ln -s {victim} {log}; python3 -I -c "{probe}"'
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
         "--decision-log", str(log), "--", "sh", "-c", steps],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "untouched\n"
    logged = [json.loads(line) for line in (real / "d.jsonl").read_text().splitlines()]
    assert [r["host"] for r in logged if r.get("decision") == "deny"] == ["evil.test"]


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_link_on_the_way_to_the_hosts_file_cannot_be_replaced_to_move_a_name(
    write_policy: Callable[[str], Path], http_upstream: Upstream, tmp_path: Path
) -> None:
    """`--hosts-file LINK/hosts`: the command replaces LINK with a directory whose hosts file
    names an allowed host at an address of its choosing; the gate, which reads the file after the
    command has started, keeps to the real one."""
    import socket

    port = http_upstream.port
    elsewhere = socket.create_server(("127.0.0.2", port))  # where the forged file points
    elsewhere.setblocking(False)
    policy = write_policy(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - {{name: a, hosts: [allowed.test], ports: [{port}]}}\n"
    )
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "hosts").write_text("127.0.0.1 allowed.test\n")
    link.symlink_to(real)
    fetch = f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://allowed.test:{port}/"
    steps = (
        f"rm {link}; mkdir {link}; echo '127.0.0.2 allowed.test' > {link}/hosts; "
        f'echo "replaced=$?"; {fetch}'
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
             "--hosts-file", str(link / "hosts"), "--", "sh", "-c", steps],
            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        with pytest.raises(BlockingIOError):
            elsewhere.accept()  # nothing came to the forged address
    finally:
        elsewhere.close()
    assert result.returncode == 0, result.stderr
    assert "replaced=0" in result.stdout and result.stdout.endswith("200"), result.stdout
    assert http_upstream.accepted == 1


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_run_joining_a_gate_elsewhere_cannot_make_the_state_directory_of_the_next_run(
    write_policy: Callable[[str], Path],
    http_upstream: Upstream,
    tmp_path: Path,
) -> None:
    """A run served by a gate elsewhere has no state of its own, and this user may have none yet:
    the command, running as that user, would make the directory where the next run's own gate
    keeps its state and write an ``approved.yaml`` that grants its ask rule, nobody asked. The
    directory is made (empty, 0700) before the sandbox exists and hidden like any other. (A run
    with ``--proxy`` runs its command whether or not that proxy answers; every joined run takes
    the directory from the same ``statedir.state_dir_to_hide``.)"""
    home = Path(tempfile.mkdtemp(prefix="h-", dir="/tmp"))  # short: the gate binds sockets in it
    try:
        _plant_then_ask(write_policy, http_upstream, tmp_path, "--proxy", home)
    finally:
        shutil.rmtree(home)


def _plant_then_ask(
    write_policy: Callable[[str], Path],
    http_upstream: Upstream,
    tmp_path: Path,
    joined: str,
    home: Path,
) -> None:
    port = http_upstream.port
    state = home / ".local" / "state" / "agent-egress"
    env = clean_env(HOME=str(home))
    env.pop("EGRESS_STATE_DIR", None)
    env.pop("XDG_STATE_HOME", None)
    plant = (
        f"mkdir -p {state}; printf '{PLANTED.format(port=port)}' > {state}/approved.yaml; "
        'echo "plant=$?"'
    )
    planted = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", joined, "http://127.0.0.1:9",
         "--", "sh", "-c", plant],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "plant=" in planted.stdout and "plant=0" not in planted.stdout, planted.stderr
    assert not (state / "approved.yaml").exists()
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    policy, hosts = _asking(write_policy, port, tmp_path)
    log = tmp_path / "decisions.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
         "--hosts-file", str(hosts), "--decision-log", str(log),
         "--", sys.executable, "-I", "-c", CONNECT.format(port=port)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "answer=403" in result.stdout, result.stdout + result.stderr
    decided = [json.loads(line) for line in log.read_text().splitlines()]
    final = [r for r in decided if r.get("host") == "ask.test" and r["decision"] != "ask"]
    assert [(r["decision"], r["reason"]) for r in final] == [("deny", "approval-timeout")]
    assert http_upstream.accepted == 0
