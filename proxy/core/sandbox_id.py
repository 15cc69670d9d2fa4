"""The one spelling rule for sandbox ids, wherever an id enters: identities file, hand-off, CLI.

An id is carried on every decision, log line, metric label and proxy URL, so it is short and plain.
Checked with ``fullmatch``: a ``^...$`` pattern with ``match`` also accepts a trailing newline
(``$`` matches before one), which would let ``"agent-7\\n"`` through.
"""

from __future__ import annotations

import re

SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SANDBOX_ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_sandbox_id(text: object) -> bool:
    return isinstance(text, str) and SANDBOX_ID.fullmatch(text) is not None


def check_sandbox_id(text: str) -> str:
    """``text`` unchanged, or ValueError naming it and the rule."""
    if not is_sandbox_id(text):
        raise ValueError(f"{text!r} is not a sandbox id: use {SANDBOX_ID_RULE}")
    return text
