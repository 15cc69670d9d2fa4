"""A short soak through a real ``egress serve`` (``make bench`` runs the long one): no descriptor
leaks, every decision journaled exactly once, every answer the right one. Memory growth is printed,
not asserted (it is a measurement, not a pass/fail property at this size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import soak

pytestmark = pytest.mark.timeout(300)


def test_a_few_thousand_connections_leak_nothing_and_are_each_recorded_once(tmp_path: Path) -> None:
    result = soak(3_000, tmp_path)
    print(result.table())
    assert result.wrong_answers == 0
    assert (result.decisions, result.allowed, result.refused) == (3_000, 1_500, 1_500)
    assert result.unique_ids == 3_000 + 200  # no decision journaled twice
    assert result.fds_after <= result.fds_before
