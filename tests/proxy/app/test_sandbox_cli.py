"""The sandbox commands (`run`, `doctor`, `connect`) as `register(subparsers)` adds them to `egress`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.app.sandbox_cli import register

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
