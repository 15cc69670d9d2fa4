"""The shared per-user gate must not become a way out of a sandbox (threats 10, 14, 20).

The shared gate's socket accepts any process of its user and serves whatever policy the hand-off
names. Hiding its directory in the sandboxes of ``--reuse-gate`` runs is not enough: a sandbox of a
run with its own gate (no flag, or a run that fell back to its own gate: an ask rule, a journal)
runs as the same user while the shared gate lives, so the gate itself must refuse a peer that is
not in its own network namespace (a launcher never is in a sandbox's). The gate must not run code
from the directory the launcher that started it worked in (a repository the agent writes to), and a
run must be served with the presets directory it names, not the one of the run that started the
gate.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Upstream
from tests.usergate_support import ESCAPE, UserGateWorld, loopback_policy
from tests.usergate_support import world as make_world

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


@pytest.mark.parametrize(
    "own_gate",
    [
        pytest.param([], id="run-without-the-flag"),
        pytest.param(["--reuse-gate", "--json"], id="run-that-fell-back"),
        pytest.param(["--reuse-gate", "--json", "--runtime"], id="run-in-another-runtime-dir"),
    ],
)
def test_a_sandbox_with_its_own_gate_cannot_hand_itself_to_the_shared_gate(
    world: UserGateWorld,
    write_policy: Callable[[str], Path],
    plain: Upstream,
    tmp_path: Path,
    own_gate: list[str],
) -> None:
    from proxy.sandbox.usergate import CODE

    narrow = write_policy("version: 1\nrules: []\n")
    wide = loopback_policy(write_policy, plain.port)
    warm = world.run("--reuse-gate", "--policy", str(narrow), "--", "true")
    assert warm.returncode == 0, warm.stderr
    gate_socket = world.directory / "gate.sock"
    assert gate_socket.is_socket()
    script = tmp_path / "escape.py"
    script.write_text(ESCAPE)
    env = world.env()
    if "--runtime" in own_gate:  # the gate's directory is not where this run would hide it
        own_gate = [arg for arg in own_gate if arg != "--runtime"]
        elsewhere = world.root / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(elsewhere)
    before = plain.accepted
    result = world.run(
        *own_gate, "--policy", str(narrow), "--",
        sys.executable, str(script), str(gate_socket), str(wide), CODE, str(plain.port),
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("attack=refused", "attack=FileNotFoundError"), result.stdout
    assert plain.accepted == before


def test_the_shared_gate_runs_no_code_from_the_launchers_working_directory(
    world: UserGateWorld, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A repository the agent works in (and writes to from its sandbox) holds a module named like
    one the gate imports; the first ``--reuse-gate`` run in it starts the gate."""
    marker = tmp_path / "ran-outside-the-sandbox"
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("argparse", "asyncio", "json", "logging"):
        (repo / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    policy = write_policy("version: 1\nrules: []\n")
    egress = Path(sys.executable).parent / "egress"  # the console script: its own directory first
    if not egress.exists():
        pytest.skip("no egress console script next to the interpreter")
    result = subprocess.run(
        [str(egress), "run", "--reuse-gate", "--policy", str(policy), "--", "true"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        env=world.env(),
    )
    assert not marker.exists(), "ran outside the sandbox: " + marker.read_text()
    assert result.returncode == 0, result.stderr
    assert world.gate_pid() is not None, result.stderr  # the shared gate did start


def test_a_run_is_served_with_its_own_presets_directory(
    world: UserGateWorld, write_policy: Callable[[str], Path], plain: Upstream, tmp_path: Path
) -> None:
    """The run that starts the gate names a presets directory whose ``team`` preset allows the
    upstream; a later run names another one, whose ``team`` preset allows nothing."""
    wide_dir, narrow_dir = tmp_path / "wide", tmp_path / "narrow"
    wide_dir.mkdir()
    narrow_dir.mkdir()
    (wide_dir / "team.yaml").write_text(
        f"version: 1\nrules:\n  - name: up\n    hosts: [localhost]\n    ports: [{plain.port}]\n"
    )
    (narrow_dir / "team.yaml").write_text("version: 1\nrules: []\n")
    policy = write_policy(
        """
        version: 1
        allow_internal: [127.0.0.0/8, "::1/128"]
        include: [team]
        rules: []
        """
    )
    fetch = (
        f"curl -sS -m 10 --noproxy '' -o /dev/null -w '%{{http_code}}' "
        f"http://localhost:{plain.port}/"
    )
    first = world.run(
        "--reuse-gate", "--policy", str(policy), "--", "true",
        env=world.env(EGRESS_PRESETS_DIR=str(wide_dir)),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = plain.accepted
    second = world.run(
        "--reuse-gate", "--policy", str(policy), "--", "sh", "-c", fetch,
        env=world.env(EGRESS_PRESETS_DIR=str(narrow_dir)),
    )  # fmt: skip
    assert second.stdout == "403", second.stderr
    assert plain.accepted == before


def test_a_sandbox_on_the_shared_gate_cannot_read_this_users_own_gate_state(
    world: UserGateWorld, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """The shared gate keeps its state (CA key) in the directory of the run that started it; a later
    run whose own state directory is another one (its private gates' CA key) hides that one too, as
    a run with its own gate would."""
    policy = write_policy("version: 1\nrules: []\n")
    first = world.run("--reuse-gate", "--policy", str(policy), "--", "true")
    assert first.returncode == 0, first.stderr
    own = tmp_path / "own-state"
    own.mkdir(mode=0o700)
    (own / "ca-key.pem").write_text("secret\n")
    env = world.env()
    env["EGRESS_STATE_DIR"] = str(own)
    read = world.run(
        "--reuse-gate", "--policy", str(policy), "--", "cat", str(own / "ca-key.pem"), env=env
    )  # fmt: skip
    assert "secret" not in read.stdout
    assert read.returncode != 0


# Inside a sandbox: a fake per-user gate planted where a later run's launcher will look for one.
# It takes the sandbox handed to it and writes down what that sandbox sent.
FAKE_GATE = """
import json, os, socket, sys
directory, out = sys.argv[1], sys.argv[2]
try:
    os.mkdir(directory, 0o700)
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(directory, "gate.sock"))
except OSError as exc:
    open(out + ".ready", "w").write("cannot plant: " + type(exc).__name__)
    raise SystemExit(0)
server.listen(1)
server.settimeout(60)
open(out + ".ready", "w").write("planted")
conn, _ = server.accept()
check = conn.recv(65536)
conn.sendall(json.dumps({"ok": True, "inspects": False}).encode())
msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 8)
conn.sendall(json.dumps({"ok": True, "accepted": json.loads(msg)["listeners"]}).encode())
listener = socket.socket(fileno=fds[0])
listener.settimeout(30)
victim, _ = listener.accept()
head = victim.recv(65536)
open(out, "wb").write(check + b"\\n" + head)
victim.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n")
"""


@pytest.mark.parametrize("attacker_runtime", ["same", "elsewhere"])
def test_a_gate_planted_by_a_sandbox_is_never_handed_a_later_runs_sandbox(
    world: UserGateWorld,
    write_policy: Callable[[str], Path],
    plain: Upstream,
    tmp_path: Path,
    attacker_runtime: str,
) -> None:
    """A sandbox (of a run with its own gate) creates the per-user gate's directory and a socket in
    it before any shared gate runs; the next ``--reuse-gate`` run must not hand its sandbox (and
    its requests, and its summary) to that process."""
    narrow = write_policy("version: 1\nrules: []\n")
    wide = loopback_policy(write_policy, plain.port)
    script = tmp_path / "fake_gate.py"
    script.write_text(FAKE_GATE)
    captured = tmp_path / "captured"
    ready = Path(str(captured) + ".ready")
    env = world.env()
    if attacker_runtime == "elsewhere":  # the victim's directory is not where this run looks
        elsewhere = world.root / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(elsewhere)
    attacker = subprocess.Popen(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(narrow), "--",
         sys.executable, str(script), str(world.directory), str(captured)],
        cwd=Path(__file__).resolve().parents[2], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(600):
            if (ready.exists() and ready.read_text()) or attacker.poll() is not None:
                break
            import time

            time.sleep(0.05)
        before = plain.accepted
        fetch = (
            f"curl -sS -m 10 --noproxy '' -o /dev/null -w '%{{http_code}}' "
            f"-H 'Authorization: Bearer victim-secret' http://localhost:{plain.port}/"
        )
        victim = world.run("--reuse-gate", "--policy", str(wide), "--", "sh", "-c", fetch)
        assert not captured.exists(), captured.read_text()
        assert victim.stdout == "200", victim.stderr
        assert plain.accepted == before + 1  # through a real gate of its own
    finally:
        attacker.kill()
        attacker.communicate(timeout=30)


def test_files_planted_in_the_gates_directory_are_not_followed(
    world: UserGateWorld, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """The directory is this user's, but a sandbox may have made it (under another runtime
    directory's name): its pid, log and lock names must not be symlinks the gate writes through."""
    policy = write_policy("version: 1\nrules: []\n")
    world.directory.mkdir(mode=0o700)
    targets = {}
    for name in ("gate.pid", "gate.log", "start.lock"):
        target = tmp_path / f"precious-{name}"
        target.write_text("keep me\n")
        (world.directory / name).symlink_to(target)
        targets[name] = target
    world.run("--reuse-gate", "--policy", str(policy), "--", "true")
    for name, target in targets.items():
        assert target.read_text() == "keep me\n", name
