"""The W3C ``traceparent`` an agent runner hands to ``egress run``, parsed strictly.

https://www.w3.org/TR/trace-context/#traceparent-header: ``VERSION-TRACEID-PARENTID-FLAGS`` in lower-case
hex. Version ff is invalid; an all-zero trace or parent id is invalid; version 00 has exactly four
fields. A later version may add fields after the flags, which are ignored. Anything else is refused:
a malformed value is ignored with a warning rather than half-used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_HEX = re.compile(r"[0-9a-f]+")


class InvalidTraceparent(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the caller's span, parent of each decision's own span
    flags: str  # 2 hex digits


def parse(text: str) -> TraceParent:
    value = text.strip()
    if len(value) > 512:
        raise InvalidTraceparent("longer than 512 characters")
    parts = value.split("-")
    if len(parts) < 4:
        raise InvalidTraceparent("expected VERSION-TRACEID-PARENTID-FLAGS")
    version, trace_id, span_id, flags = parts[:4]
    for name, part, size in (
        ("version", version, 2),
        ("trace-id", trace_id, 32),
        ("parent-id", span_id, 16),
        ("trace-flags", flags, 2),
    ):
        if len(part) != size or not _HEX.fullmatch(part):
            raise InvalidTraceparent(f"{name} must be {size} lower-case hex digits")
    if version == "ff":
        raise InvalidTraceparent("version ff is invalid")
    if version == "00" and len(parts) != 4:
        raise InvalidTraceparent("version 00 has exactly four fields")
    if trace_id == "0" * 32:
        raise InvalidTraceparent("the trace-id is all zeros")
    if span_id == "0" * 16:
        raise InvalidTraceparent("the parent-id is all zeros")
    return TraceParent(trace_id, span_id, flags)


def new_span_id() -> str:
    """64 random bits, never all zero."""
    while True:
        span = os.urandom(8).hex()
        if span != "0" * 16:
            return span
