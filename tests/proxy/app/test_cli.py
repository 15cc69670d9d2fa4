"""The ``egress`` CLI as users run it: the installed console script in a subprocess, exit codes included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EGRESS, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: pypi\n"
        "    hosts: [pypi.org]\n"
        "  - name: plain\n"
        "    hosts: [deb.example.org]\n"
        "    ports: [80]\n"
    )
    return path


def test_version_and_help() -> None:
    assert run("--version").stdout.strip() == f"agent-egress {__version__}"
    for command in ("serve", "check", "lint", "audit"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: egress" in result.stdout


@pytest.mark.parametrize(
    ("target", "code", "reason"),
    [
        ("https://pypi.org/simple/", 0, "allowed-by-rule"),
        ("pypi.org", 0, "allowed-by-rule"),
        ("PyPI.org.:443", 0, "allowed-by-rule"),
        ("pypi.org:22", 1, "port-not-allowed"),
        ("https://pypi.org.evil.com/", 1, "no-matching-rule"),
        ("http://deb.example.org/dists/", 0, "allowed-by-rule"),
        ("https://deb.example.org/", 1, "port-not-allowed"),
        ("http://0xA9FEA9FE/latest", 1, "no-matching-rule"),
    ],
)
def test_check_exit_codes_and_json(policy: Path, target: str, code: int, reason: str) -> None:
    result = run("check", "--policy", str(policy), "--json", target)
    assert result.returncode == code, result.stderr
    decision = json.loads(result.stdout)
    assert decision["reason"] == reason


def test_check_human_output_names_rule_and_reason(policy: Path) -> None:
    result = run("check", "--policy", str(policy), "pypi.org:22")
    assert result.returncode == 1
    assert "DENY pypi.org:22 rule=pypi reason=port-not-allowed" in result.stdout


def test_check_errors_exit_2(policy: Path, tmp_path: Path) -> None:
    assert run("check", "--policy", str(policy), "ftp://pypi.org/").returncode == 2
    assert run("check", "--policy", str(policy), "https://user:pw@pypi.org/").returncode == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules:\n  - name: x\n    hosts: ['*']\n")
    result = run("check", "--policy", str(broken), "pypi.org")
    assert result.returncode == 2
    assert "broken.yaml:4" in result.stderr
    assert f"error: refusing to load {broken}: 1 problem(s)" in result.stderr


def test_lint_reports_every_problem_with_location(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: a\n"
        "    hosts: [ok.example.com]\n"
        "    ports: [70000]\n"
        "  - name: a\n"
        "    hosts: ['*.com']\n"
        "    colour: red\n"
    )
    result = run("lint", str(bad))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 4, result.stdout
    assert any("bad.yaml:5" in line and "ports" in line for line in lines)
    assert any("bad.yaml:7" in line and "hosts" in line for line in lines)
    assert any("bad.yaml:8" in line and "colour" in line for line in lines)
    assert any("duplicate" in line and "'a'" in line for line in lines)


def test_lint_passes_every_shipped_preset() -> None:
    presets = sorted(str(p) for p in (Path(__file__).parents[3] / "allowlists").glob("*.yaml"))
    result = run("lint", *presets)
    assert result.returncode == 0, result.stdout + result.stderr


def test_token_prints_a_credential_for_a_valid_id() -> None:
    result = run("token", "agent-7")
    assert result.returncode == 0, result.stderr
    assert "  - id: agent-7\n    token_sha256: " in result.stdout


@pytest.mark.parametrize("bad", ["agent-7\n", "a b", "", ".x", "x" * 65])
def test_token_refuses_an_invalid_id(bad: str) -> None:
    result = run("token", bad)
    assert result.returncode == 2
    assert "is not a sandbox id" in result.stderr
    assert "token_sha256" not in result.stdout
