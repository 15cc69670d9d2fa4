"""The managed ceiling on the command line: ``egress serve`` and ``egress run`` refuse to start past
it or without it loading, ``$EGRESS_MANAGED_POLICY`` works like the flag, ``egress lint --managed``
shows the problems before rollout, and ``egress check`` decides with both layers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import clean_env
from tests.proxy.app.test_serve import EGRESS, Serve

MANAGED = """\
version: 1
rules:
  - name: org-pypi
    hosts: ["**.pypi.org"]
  - name: org-no-test
    action: deny
    hosts: [test.pypi.org]
"""
NARROW = "version: 1\nrules:\n  - name: pypi\n    hosts: ['*.pypi.org']\n"
WIDE = NARROW + "  - name: evil\n    hosts: [evil.example]\n"


def egress(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS, *args], capture_output=True, text=True, timeout=60, env=clean_env(**env)
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("managed", MANAGED), ("narrow", NARROW), ("wide", WIDE)):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    out["broken"] = tmp_path / "broken.yaml"
    out["broken"].write_text("version: 1\nrules: [\n")
    return out


def test_serve_refuses_to_start_past_the_ceiling_or_without_it(files: dict[str, Path]) -> None:
    for args, env, expected in (
        (["--managed-policy", str(files["managed"])], {}, "rule 'evil'"),
        ([], {"EGRESS_MANAGED_POLICY": str(files["managed"])}, "rule 'evil'"),
        (["--managed-policy", str(files["broken"])], {}, "broken.yaml"),
        (["--managed-policy", str(files["broken"].with_name("gone.yaml"))], {}, "cannot read"),
    ):
        result = egress(
            "serve", "--listen", "127.0.0.1:0", "--no-metrics", "--policy", str(files["wide"]),
            *args, **env,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "refusing to load" in result.stderr


def test_serve_runs_a_narrower_policy_and_names_the_managed_file(files: dict[str, Path]) -> None:
    serve = Serve(
        "--policy", str(files["narrow"]), "--managed-policy", str(files["managed"]),
        "--nameserver", "127.0.0.1:9",
    )  # fmt: skip
    try:
        assert serve.info["managed"] == str(files["managed"])
    finally:
        assert serve.stop() == 0


def test_run_refuses_to_start_past_the_ceiling(files: dict[str, Path]) -> None:
    result = egress(
        "run", "--policy", str(files["wide"]), "--managed-policy", str(files["managed"]),
        "--", "true",
    )  # fmt: skip
    assert result.returncode != 0
    assert "rule 'evil'" in result.stderr and "the command was not run" in result.stderr


def test_lint_managed_shows_the_problem_before_rollout(files: dict[str, Path]) -> None:
    assert egress("lint", str(files["wide"])).returncode == 0
    result = egress("lint", "--managed", str(files["managed"]), str(files["wide"]))
    assert result.returncode == 1
    assert "wide.yaml:5: rule 'evil': key 'hosts'" in result.stdout
    assert "outside the managed ceiling" in result.stdout
    assert egress("lint", "--managed", str(files["managed"]), str(files["narrow"])).returncode == 0


def test_check_decides_with_both_layers(files: dict[str, Path]) -> None:
    result = egress(
        "check", "--policy", str(files["narrow"]), "--managed-policy", str(files["managed"]),
        "test.pypi.org:443",
    )  # fmt: skip
    assert "org-no-test" in result.stdout + result.stderr, result.stdout + result.stderr
