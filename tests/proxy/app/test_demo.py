"""``make demo``'s git part, offline: the clone from the local GitHub stand-in works, the push is
refused with the gate's reason, and the stand-in never sees it. (The other steps reach pypi.org and
are exercised by running the demo itself.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.app.demo import GIT_HOST, GIT_STEPS, PRELUDE, _git_stand_in
from proxy.policy.loader import lint_files
from tests.harness import clean_env

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[3]


def test_the_demo_clones_and_its_push_is_refused(tmp_path: Path) -> None:
    stand_in = _git_stand_in(tmp_path)
    if stand_in is None:
        pytest.skip("git is not installed")
    server, policy, ca = stand_in
    try:
        assert [str(p) for p in lint_files([policy])] == []
        env = clean_env(
            GIT_URL=f"https://{GIT_HOST}:{server.port}/myorg/demo.git",
            EGRESS_STATE_DIR=str(tmp_path / "state"),
        )
        result = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy),
             "--hosts-file", str(tmp_path / "hosts"), "--upstream-ca", str(ca),
             "--", "sh", "-c", PRELUDE + GIT_STEPS],
            cwd=REPO, capture_output=True, text=True, timeout=100, env=env,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "cloned: hello through the gate" in result.stdout
    assert "remote: agent-egress refused this request." in result.stdout
    assert "rule:    demo-github-no-push" in result.stdout
    assert server.saw("git-upload-pack") and not server.saw("receive-pack")
