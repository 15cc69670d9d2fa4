"""A decision or event as the sinks that write text take it: its fields built once, encoded once.

The journal encodes each record with its chain fields (``seq``, ``prev``) and hashes that text; the
JSON decision log then writes the same text as its line (:meth:`Serialised.line`), so with a journal the
encoder runs once per record for both, and a log line is the exact text its journal record's ``hash``
covers. Without a journal (or for a record the journal could not write) the log line is the canonical
JSON of the fields alone. Both are sorted-key, compact, ASCII-only JSON
(:func:`proxy.evidence.journal.chain.canonical`).

A decision is written straight from its fields (:mod:`proxy.evidence.record_json`, the same bytes):
its dict is built only for a sink that asks for ``fields``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.core.decision import Decision
from proxy.evidence.journal.chain import canonical
from proxy.evidence.record import decision_record
from proxy.evidence.record_json import decision_text, event_text


class Serialised:
    """One record's fields, and its text once a sink encoded it."""

    __slots__ = ("_fields", "hashed")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        # The journal's hashed text of this record (fields plus seq and prev), once it is written.
        self.hashed: bytes | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The record as field -> JSON value (without ``seq``, ``prev`` and ``hash``)."""
        return self._fields

    def chained(self, seq: int, prev: str) -> bytes:
        """The journal's text of this record: its canonical JSON with ``seq`` and ``prev`` (a
        ``hash`` field among the fields is left out; the journal appends the real one)."""
        fast = event_text(self._fields, seq, prev)  # None unless a connection-closed event
        if fast is not None:
            return fast.encode("ascii")
        body = dict(self._fields)
        body.pop("hash", None)
        body["seq"] = seq
        body["prev"] = prev
        return canonical(body).encode("ascii")

    def line(self) -> bytes:
        """The record as one JSON line (newline-terminated ASCII)."""
        if self.hashed is not None:
            return self.hashed + b"\n"
        text = event_text(self._fields, None, None)
        if text is None:
            text = canonical(self._fields)
        return (text + "\n").encode("ascii")


class SerialisedDecision(Serialised):
    """A decision: encoded from the decision itself, its dict built only if a sink reads ``fields``."""

    __slots__ = ("decision",)

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.hashed = None

    @property
    def fields(self) -> dict[str, Any]:
        return decision_record(self.decision)

    def chained(self, seq: int, prev: str) -> bytes:
        return decision_text(self.decision, seq, prev).encode("ascii")

    def line(self) -> bytes:
        if self.hashed is not None:
            return self.hashed + b"\n"
        return (decision_text(self.decision, None, None) + "\n").encode("ascii")


def serialise_decision(decision: Decision) -> Serialised:
    """The decision's fields as ``decision_record`` has them (a test keeps the two equal)."""
    return SerialisedDecision(decision)


def serialise_event(name: str, attributes: Mapping[str, Any]) -> Serialised | None:
    """The event as both the journal and the log record it, or None when they would record different
    fields (an event without its own ``ts``: the journal stamps one, the log does not)."""
    if "ts" not in attributes or "event" in attributes:
        return None
    return Serialised({**attributes, "event": name})
