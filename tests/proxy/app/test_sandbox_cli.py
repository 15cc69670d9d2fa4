"""The sandbox commands (`run`, `doctor`, `connect`) as `register(subparsers)` adds them to `egress`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.app.sandbox_cli import register
from tests.harness import clean_env, fresh_python

REPO = Path(__file__).resolve().parents[3]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egress")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_run_arguments() -> None:
    args = parser().parse_args(
        ["run", "--policy", "p.yaml", "--sandbox-id", "sbx-1", "--quiet", "--", "ls", "-la", "--x"]
    )
    assert args.policy == "p.yaml" and args.sandbox_id == "sbx-1" and args.quiet
    assert [a for a in args.cmd if a != "--"] == ["ls", "-la", "--x"]
    assert args.proxy_port == 3128 and not args.no_isolation and args.proxy is None


def test_run_joined_arguments() -> None:
    args = parser().parse_args(
        ["run", "--proxy", "http://gate:3128", "--dns", "10.0.0.2:53", "--", "true"]
    )
    assert args.proxy == "http://gate:3128" and args.dns == ("10.0.0.2", 53)


@pytest.mark.parametrize("bad", ["a b", "../x", "", "x" * 65, "-x", "sbx\n1", "agent-7\n"])
def test_sandbox_id_is_validated(bad: str) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--sandbox-id", bad, "--", "true"])


def test_connect_and_doctor_arguments() -> None:
    args = parser().parse_args(["connect", "github.com", "22"])
    assert (args.host, args.port, args.proxy) == ("github.com", 22, None)
    assert parser().parse_args(["doctor", "--json"]).json


def test_egress_help_lists_the_commands_and_stays_fast() -> None:
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert out.returncode == 0
    for name in ("run", "doctor", "connect"):
        assert name in out.stdout
    assert time.monotonic() - start < 5
    assert "mitmproxy" not in subprocess.run(
        [sys.executable, "-c", "import sys, proxy.app.cli; proxy.app.cli.build_parser(); "
         "print(' '.join(m for m in sys.modules if m.startswith('mitmproxy')))"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip


def test_run_without_a_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--"], cwd=REPO, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 125
    assert "no command given" in out.stderr


GATE_START = """
import asyncio, json, sys
from proxy.app.private_gate import start_private_gate
from proxy.app.sandbox_cli import GATE_MODULES
from proxy.evidence.emit import Emitter
from proxy.policy.loader import load_policy
from proxy.sandbox.launcher import _LAUNCHER_MODULES
from proxy.sandbox.private_gate import GateRequest

before = set(sys.modules)
policy = load_policy(sys.argv[1])

async def main():
    gate = await start_private_gate(GateRequest(policy, Emitter([]), None, None, "sbx-steps",
                                                state_dir=sys.argv[2]))
    await gate.stop()

asyncio.run(main())
for name in _LAUNCHER_MODULES:  # the launcher's own steps: they must import
    __import__(name)
print(json.dumps({
    "never": [m for m in GATE_MODULES if m not in sys.modules],
    "started": [m for m in GATE_MODULES if m not in before],
}))
"""


def test_the_steps_a_private_gate_loads_in_are_what_its_start_imports(tmp_path: Path) -> None:
    """`egress run` loads the private gate's modules a step at a time by name while the command
    starts: each name must be one a start imports (a renamed or dropped module would leave a step
    that loads nothing, and the gate's imports back on the command's path)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: a\n    hosts: [a.test]\n")
    out = json.loads(
        fresh_python(GATE_START, str(policy), str(tmp_path / "state"), cwd=REPO, env=clean_env())
    )
    assert out["never"] == []
    assert out["started"], "the gate's start imported none of GATE_MODULES"
