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


def test_the_last_reload_names_the_rules_it_added_removed_and_changed(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD + "  - name: b\n    hosts: [b.test]\n  - name: c\n    hosts: [c.test]\n")
    holder = PolicyHolder(path, load_policy(path))
    assert holder.last_reload is None
    first = holder().version
    # a: only moved down a line (not a change); b: another host; c: gone; d: new.
    path.write_text(
        "version: 1\n\nrules:\n  - name: a\n    hosts: [a.test]\n"
        "  - name: b\n    hosts: [b2.test]\n  - name: d\n    hosts: [d.test]\n"
    )
    assert holder.reload() is True
    done = holder.last_reload
    assert done is not None and done.ok
    assert (done.from_version, done.to_version) == (first, holder().version)
    assert (done.added, done.removed, done.changed) == (("d",), ("c",), ("b",))
    assert done.to_json()["added"] == ["d"]

    path.write_text("version: 1\nrules: [")
    assert holder.reload() is False
    failed = holder.last_reload
    assert failed is not None and not failed.ok
    assert failed.from_version == failed.to_version == holder().version
    assert (failed.added, failed.removed, failed.changed) == ((), (), ())


def test_prepare_changes_nothing_and_install_records_rules_and_hosts(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    holder = PolicyHolder(path, load_policy(path))
    before = holder()
    path.write_text("version: 1\nrules:\n  - name: b\n    hosts: [b.test, '*.c.test']\n")
    new = holder.prepare()
    assert holder() is before
    done = holder.install(new)
    assert holder() is new and not holder.stale
    assert (done.added, done.removed) == (("b",), ("a",))
    assert (done.hosts_added, done.hosts_removed) == (("*.c.test", "b.test"), ("a.test",))


def test_a_refused_reload_is_stale_counted_and_names_file_line_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    holder = PolicyHolder(path, load_policy(path))
    path.write_text(GOOD + "  - name: wide\n    hosts: ['*.com']\n")
    assert holder.reload() is False
    assert holder.stale and holder.failures == 1
    assert holder.last_reload is not None
    assert any(":6: rule 'wide': key 'hosts'" in p for p in holder.last_reload.problems)
    path.write_text(GOOD)
    assert holder.reload() is True and not holder.stale
