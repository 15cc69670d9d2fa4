"""A reload that fails keeps the policy in force and says so; a good one swaps atomically."""

from __future__ import annotations

from pathlib import Path

from proxy.policy.loader import load_policy
from proxy.policy.reload import PolicyHolder

GOOD = "version: 1\nrules:\n  - name: a\n    hosts: [a.test]\n"


def test_good_reload_swaps_and_notifies(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    seen: list[tuple[str, str]] = []
    holder = PolicyHolder(
        path, load_policy(path), on_reload=lambda r, p: seen.append((r, p.version))
    )
    old = holder().version
    path.write_text(GOOD + "  - name: b\n    hosts: [b.test]\n")
    assert holder.reload() is True
    assert holder().version != old and [r.name for r in holder().rules] == ["a", "b"]
    assert seen == [("success", holder().version)]


def test_broken_or_missing_file_keeps_the_old_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    seen: list[str] = []
    holder = PolicyHolder(path, load_policy(path), on_reload=lambda r, p: seen.append(r))
    before = holder()
    path.write_text("version: 1\nrules:\n  - name: all\n    hosts: ['*']\n")  # would widen
    assert holder.reload() is False
    path.write_bytes(b"version: 1\n\x00\x07")
    assert holder.reload() is False
    path.unlink()
    assert holder.reload() is False
    assert holder() is before
    assert seen == ["error", "error", "error"]
