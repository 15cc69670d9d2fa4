"""The git smart-HTTP server the demo uses (``proxy.app.demogit``), for tests: a repository that
would accept a push, and a request log that proves none reached it."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.app.demogit import GIT, GitServer
from proxy.app.demogit import make_repository as _make_repository

__all__ = ["GIT", "GitServer", "make_repository"]


def make_repository(directory: Path, name: str = "demo.git") -> Path:
    """A bare repository with one commit, accepting pushes over HTTP; skips without git."""
    try:
        return _make_repository(directory, name)
    except FileNotFoundError:
        pytest.skip("git is not installed")
