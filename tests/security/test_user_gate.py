"""A sandbox served by this user's shared gate tries to give itself a wider policy (threats 10, 12).

The sandboxed command runs as the same user as the shared gate, whose Unix socket accepts any
process of that user. If the command could reach the socket, it could hand over listeners of its own
(in its own network namespace, as the gate requires) naming a policy that allows anything. So the
gate's directory is hidden inside every sandbox; and each run's summary counts only its own
decisions.
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


def test_a_sandbox_cannot_reach_the_shared_gate_to_widen_its_policy(
    world: UserGateWorld,
    write_policy: Callable[[str], Path],
    plain: Upstream,
    tmp_path: Path,
) -> None:
    from proxy.sandbox.usergate import CODE

    port = plain.port
    narrow = write_policy("version: 1\nrules: []\n")
    wide = loopback_policy(write_policy, port)
    script = tmp_path / "attack.py"
    script.write_text(ESCAPE)
    gate_socket = world.directory / "gate.sock"
    before = plain.accepted
    result = world.run(
        "--reuse-gate", "--policy", str(narrow), "--",
        sys.executable, str(script), str(gate_socket), str(wide), CODE, str(port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "attack=FileNotFoundError"
    assert gate_socket.is_socket()  # the gate was there, outside the sandbox
    # and the narrow run's own route still refuses the upstream, which sees nothing
    fetch = f"curl -sS -m 10 --noproxy '' -o /dev/null -w '%{{http_code}}' http://localhost:{port}/"
    refused = world.run("--reuse-gate", "--policy", str(narrow), "--", "sh", "-c", fetch)
    assert refused.stdout == "403", refused.stderr
    assert plain.accepted == before


def test_a_runs_summary_counts_no_other_runs_decisions(
    world: UserGateWorld, write_policy: Callable[[str], Path], plain: Upstream
) -> None:
    """Two runs at once on one gate: each summary holds its own requests only."""
    port = plain.port
    policy = loopback_policy(write_policy, port)
    warm = world.run("--reuse-gate", "--policy", str(policy), "--", "true")
    assert warm.returncode == 0, warm.stderr

    def fetches(n: int) -> str:
        one = f"curl -sS -m 10 --noproxy '' -o /dev/null http://localhost:{port}/"
        return "; ".join([one] * n) + "; sleep 0.5"

    argv = [sys.executable, "-m", "proxy.app.cli", "run", "--reuse-gate", "--policy", str(policy)]
    runs = [
        subprocess.Popen(
            [*argv, "--", "sh", "-c", fetches(n)],
            cwd=Path(__file__).resolve().parents[2],
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (2, 5)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert "2 request(s) allowed, 0 refused" in outputs[0][1]
    assert "5 request(s) allowed, 0 refused" in outputs[1][1]
