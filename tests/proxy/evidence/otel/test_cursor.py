"""The export cursor survives restarts and never leaves half a number."""

from __future__ import annotations

from pathlib import Path

from proxy.evidence.otel.cursor import cursor_path, read_cursor, write_cursor


def test_cursor_round_trip_beside_a_hidden_name(tmp_path: Path) -> None:
    journal = tmp_path / "audit.jsonl"
    path = cursor_path(journal)
    assert path.parent == tmp_path and path.name.startswith(".")
    assert read_cursor(path) is None
    write_cursor(path, 41)
    write_cursor(path, 42)
    assert read_cursor(path) == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_an_unreadable_cursor_means_start_at_the_end(tmp_path: Path) -> None:
    path = cursor_path(tmp_path / "audit.jsonl")
    path.write_text("forty-two\n")
    assert read_cursor(path) is None
