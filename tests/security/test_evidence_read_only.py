"""A command cannot rewrite its own run's evidence (threats 10 and 14).

The audit journal and the decision log of ``egress run`` are files of the user who runs it, and so is
the command. The journal's hash chain has no key: a command that could write the file could drop its
own refusals and compute the chain again, and ``egress audit verify`` would pass. Both files are
read-only inside the sandbox, with the run's own gate and with the per-user gate alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.usergate_support import REPO, UserGateWorld
from tests.usergate_support import world as make_world


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


def _tamper(*files: Path) -> str:
    steps = ["curl -s -m 5 -o /dev/null https://refused.example/exfil"]  # a refusal to hide
    for index, path in enumerate(files):
        steps += [
            f'printf "" > {path}; echo "truncate{index}=$?"',
            f'printf "{{}}\\n" >> {path}; echo "append{index}=$?"',
            f'mv {path} {path}.old; echo "rename{index}=$?"',
            f'rm -f {path}; echo "remove{index}=$?"',
            # the directory holding it, mount and all, then a forged one in its place
            f'mv {path.parent} {path.parent}.moved; echo "movedir{index}=$?"',
        ]
    return "; ".join(steps)


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
def test_a_command_cannot_rewrite_its_journal_or_its_decision_log(
    world: UserGateWorld, tmp_path: Path, reuse: bool
) -> None:
    log = tmp_path / "evidence" / "decisions.jsonl"
    journal = tmp_path / "evidence" / "journal.jsonl"
    files = [log] if reuse else [journal, log]  # a run with its own journal gets its own gate
    flags = ["--reuse-gate"] if reuse else ["--journal", str(journal)]
    result = world.run(
        *flags, "--quiet", "--decision-log", str(log), "--", "sh", "-c", _tamper(*files)
    )
    assert result.returncode == 0, result.stderr
    for index in range(len(files)):
        for step in ("truncate", "append", "rename", "remove", "movedir"):
            assert f"{step}{index}=" in result.stdout, result.stdout
            assert f"{step}{index}=0" not in result.stdout, result.stdout
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["host"] for r in logged if r.get("decision") == "deny"] == ["refused.example"]
    assert not list(log.parent.glob("*.old")) and not (tmp_path / "evidence.moved").exists()
    if not reuse:
        verified = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "audit", "verify", str(journal)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        assert any(r.get("host") == "refused.example" for r in records), records
    assert (world.gate_pid() is not None) == reuse, result.stderr
