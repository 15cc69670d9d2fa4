"""The agent's context carried on a sandbox's decisions (``--context task=T``), checked strictly.

Keys and values end up as OTel attribute names (``egress.context.<key>``), journal fields and log
lines: keys are boring identifiers, values bounded printable text, and a sandbox holds a bounded
number of them. The context belongs to the host: it is set by ``egress run`` and changed only
through the gate's admin channel (:mod:`proxy.attribution.channel`), never from inside the sandbox.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MAX_KEYS = 32
MAX_VALUE = 256
KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")


def parse_pair(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, value); ValueError naming the problem."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text[:80]!r}: expected KEY=VALUE")
    return check_pair(key, value)


def check_pair(key: str, value: str) -> tuple[str, str]:
    if not KEY.fullmatch(key):
        raise ValueError(
            f"{key[:80]!r}: a context key is a letter then up to 63 letters, digits, '_', '.', '-'"
        )
    if len(value) > MAX_VALUE or not value.isprintable():
        raise ValueError(f"context {key}: the value must be printable, at most {MAX_VALUE} chars")
    return key, value


def merged(
    current: Mapping[str, str], updates: Iterable[tuple[str, str]], unset: Iterable[str] = ()
) -> dict[str, str]:
    """``current`` with ``updates`` applied (an empty value removes its key) and ``unset`` removed;
    ValueError when the result would hold more than MAX_KEYS keys."""
    out = dict(current)
    for key in unset:
        out.pop(key, None)
    for key, value in updates:
        key, value = check_pair(key, value)
        if value:
            out[key] = value
        else:
            out.pop(key, None)
    if len(out) > MAX_KEYS:
        raise ValueError(f"a sandbox's context holds at most {MAX_KEYS} keys")
    return out
