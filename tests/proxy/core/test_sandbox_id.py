"""The one sandbox-id rule: matched whole, so a trailing newline is not part of an id."""

from __future__ import annotations

import pytest

from proxy.core.sandbox_id import check_sandbox_id, is_sandbox_id


@pytest.mark.parametrize("good", ["a", "agent-7", "sbx-1f2e3d4c", "A.b_c-d", "7", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert is_sandbox_id(good)
    assert check_sandbox_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "agent-7\n",
        "\nagent-7",
        "agent 7",
        "",
        "-x",
        ".x",
        "_x",
        "x" * 65,
        "a/b",
        "a:b",
        "é",
        None,
        7,
    ],
)
def test_invalid_ids(bad: object) -> None:
    assert not is_sandbox_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="is not a sandbox id"):
            check_sandbox_id(bad)
