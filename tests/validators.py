"""The independent validators the deployment tests run: kubectl (kustomize), kubernetes-validate,
checkov, hadolint, check-jsonschema. scripts/install-test-deps puts them in .venv-tools (``make test``
runs it); a missing one fails the test with that fix, it never skips.

They run without a network where this machine allows it (a fresh network namespace), so a validator
that phones home cannot send anything off the machine, and a result never depends on a download.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
FIX = "run scripts/install-test-deps (make test does)"


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed in {TOOLS_BIN}; {FIX}", pytrace=False)
    return found


@functools.cache
def _offline_prefix() -> tuple[str, ...]:
    for prefix in (("unshare", "--net"), ("unshare", "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run validator ``name`` offline; returns the finished process (the caller checks it)."""
    return subprocess.run(
        [*_offline_prefix(), tool(name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def kustomize(directory: Path) -> str:
    proc = run("kubectl", "kustomize", str(directory), timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {directory}:\n{proc.stderr}"
    return proc.stdout


def checkov(*args: str) -> list[dict[str, Any]]:
    """checkov's JSON reports (one per framework), never consulting its online service."""
    proc = run("checkov", "--skip-download", "--output", "json", *args, timeout=600)
    assert proc.returncode in (0, 1), f"checkov failed to run:\n{proc.stderr[-4000:]}"
    data = json.loads(proc.stdout)
    reports: list[dict[str, Any]] = data if isinstance(data, list) else [data]
    return reports


def checkov_findings(reports: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """(failed checks as "ID resource file", {"ID resource": the reason given for skipping it})."""
    failed: list[str] = []
    skipped: dict[str, str] = {}
    for report in reports:
        results = report.get("results", {})
        for check in results.get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['resource']} {check.get('file_path')}")
        for check in results.get("skipped_checks", []):
            reason = check.get("check_result", {}).get("suppress_comment") or ""
            skipped[f"{check['check_id']} {check['resource']}"] = reason
    return failed, skipped
