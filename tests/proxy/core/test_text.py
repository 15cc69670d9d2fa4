"""The one escaper: untrusted text becomes printable, unambiguous and bounded."""

from __future__ import annotations

import pytest

from proxy.core.text import escape


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\x0ab"),
        ("tab\there", "tab\\x09here"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("ü", "\\xfc"),
        ("\u202e", "\\u202e"),
        ("back\\slash", "back\\\\slash"),
        ("\U0001f600", "\\U0001f600"),
        ("x" * 300, "x" * 256 + "..."),
        ("x" * 256, "x" * 256),
        ("\n" * 100, "\\x0a" * 64 + "..."),
        (b"bytes", "b'bytes'"),
    ],
)
def test_escape(raw: object, shown: str) -> None:
    assert escape(raw) == shown


def test_escaped_outputs_of_different_inputs_differ() -> None:
    """A client writing a backslash escape must not look like the escape of a control byte."""
    typed = "\\x1f600"  # backslash, x, 1, f, 6, 0, 0
    control = "\x1f" + "600"  # the byte 0x1f, then 600
    assert len(typed) == 7 and len(control) == 4
    assert escape(typed) != escape(control)
