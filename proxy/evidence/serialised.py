"""A decision or event as the sinks that write text take it: its fields built once, encoded once.

The journal encodes each record with its chain fields (``seq``, ``prev``) and hashes that text; the
JSON decision log then writes the same text as its line (:meth:`Serialised.line`), so with a journal the
encoder runs once per record for both, and a log line is the exact text its journal record's ``hash``
covers. Without a journal (or for a record the journal could not write) the log line is the canonical
JSON of the fields alone. Both are sorted-key, compact, ASCII-only JSON
(:func:`proxy.evidence.journal.chain.canonical`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.core.decision import Decision
from proxy.evidence.journal.chain import canonical
from proxy.evidence.record import DECISION_EVENT


class Serialised:
    """One record's fields, and its text once a sink encoded it."""

    __slots__ = ("fields", "hashed")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        # The journal's hashed text of this record (fields plus seq and prev), once it is written.
        self.hashed: bytes | None = None

    def line(self) -> bytes:
        """The record as one JSON line (newline-terminated ASCII)."""
        if self.hashed is not None:
            return self.hashed + b"\n"
        return (canonical(self.fields) + "\n").encode("ascii")


def serialise_decision(decision: Decision) -> Serialised:
    """The decision's fields as ``decision_record`` has them (a test keeps the two equal)."""
    fields = decision.to_dict()
    fields["event"] = DECISION_EVENT
    return Serialised(fields)


def serialise_event(name: str, attributes: Mapping[str, Any]) -> Serialised | None:
    """The event as both the journal and the log record it, or None when they would record different
    fields (an event without its own ``ts``: the journal stamps one, the log does not)."""
    if "ts" not in attributes or "event" in attributes:
        return None
    return Serialised({**attributes, "event": name})
