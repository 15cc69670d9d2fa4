"""The canonical JSON of the records written most often, without the general encoder's per-record work.

A decision is the record written most often (two per new TLS tunnel, one per plain-HTTP request), and
building its dict (``Decision.to_dict``) then encoding it with the general encoder (which sorts the keys
of every record) costs more than the rest of its evidence together. The field names are fixed, so their
sorted order is compiled once, at the first record: :func:`decision_text` visits the fields in that
order and writes each value as :func:`proxy.evidence.journal.chain.canonical` would. The result is byte for byte the
canonical JSON of ``decision_record(decision)`` (plus ``seq`` and ``prev`` for the journal), which is
what the journal hashes and ``egress audit verify`` recomputes; a property test holds the two equal for
arbitrary decisions, hostile strings and odd value types included.

Strings and plain ints and finite floats are written here (the escaping is the json module's own
``encode_basestring_ascii``, the function the general encoder calls for strings); any other value
(tuples, mappings, ``None`` inside them, subclasses, non-finite floats) goes through the general
encoder itself, so it is written exactly as before.

The connection-closed event (one per connection) is a dict with a known set of keys: :func:`event_text`
writes such a dict in that set's sorted order (compiled once), and leaves any other dict to the general
encoder (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from typing import Any

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.journal.chain import canonical
from proxy.evidence.record import DECISION_EVENT
from proxy.runtime import codecache

# to_dict writes these as their enum's value, whatever else it writes as given
_ENUM_FIELDS = frozenset({"decision", "reason", "kind"})
_CHAIN = ("seq", "prev")


def _value(value: Any) -> str:
    """A field value as the general encoder writes it inside a record."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)  # type: ignore[no-any-return]
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return canonical(value)


def _compile() -> Callable[[Decision, int | None, str | None], str]:
    names = tuple(f.name for f in fields(Decision))
    keys = sorted({*names, "event", *_CHAIN})
    lines = [
        "def decision_text(decision, seq, prev):",
        f"    ({', '.join(f'v_{n}' for n in names)},) = _values(decision)",
        "    parts = []",
        "    add = parts.append",
    ]
    for key in keys:
        head = encode_basestring_ascii(key) + ":"
        if key == "event":
            lines.append(f"    add({head + encode_basestring_ascii(DECISION_EVENT)!r})")
            continue
        if key in _ENUM_FIELDS:  # a StrEnum member's text is its value
            lines.append(
                f"    add({head!r} + (_esc(v_{key}) if v_{key}.__class__ in _STR_ENUMS"
                f" else _value(v_{key}.value)))"
            )
            continue
        var = key if key in _CHAIN else f"v_{key}"
        lines += [
            f"    if {var} is not None:",
            f"        kind = {var}.__class__",
            f"        add({head!r} + (_esc({var}) if kind is str else _int({var}) if kind is int"
            f" else _value({var})))",
        ]
    lines.append('    return "{" + ",".join(parts) + "}"')
    namespace: dict[str, Any] = {
        "_values": attrgetter(*names),
        "_value": _value,
        "_esc": encode_basestring_ascii,
        "_int": int.__repr__,
        "_STR_ENUMS": frozenset({Verdict, Reason, Kind}),
    }
    # The source is built above from the field names only.
    exec(codecache.compiled("\n".join(lines)), namespace)
    made: Callable[[Decision, int | None, str | None], str] = namespace["decision_text"]
    return made


_decision_text: Callable[[Decision, int | None, str | None], str] | None = None


def decision_text(decision: Decision, seq: int | None, prev: str | None) -> str:
    """``canonical(decision_record(decision))``, with ``seq`` and ``prev`` in it unless they are None
    (the journal's record; the decision log's without a journal). Compiled at the first record, not
    at import: ``egress run`` imports this module before every sandbox starts."""
    global _decision_text
    if _decision_text is None:
        _decision_text = _compile()
    return _decision_text(decision, seq, prev)


_ABSENT = object()

CLOSED_KEYS = frozenset(
    {
        "ts",
        "id",
        "kind",
        "host",
        "port",
        "rule",
        "sandbox_id",
        "client",
        "bytes_out",
        "bytes_in",
        "duration",
        "event",
    }
)
"""Every key a connection-closed event may have (``proxy.evidence.record.connection_closed``); an event
with another key is written by the general encoder."""


def _compile_dict(known: frozenset[str]) -> Callable[[dict[str, Any], int | None, str | None], str]:
    keys = sorted({*known, *_CHAIN})
    lines = [
        "def dict_text(body, seq, prev):",
        "    get = body.get",
        "    parts = []",
        "    add = parts.append",
    ]
    for key in keys:
        head = encode_basestring_ascii(key) + ":"
        if key in _CHAIN:
            lines.append(f"    value = {key}")
            test = "value is not None"
        else:
            lines.append(f"    value = get({key!r}, _ABSENT)")
            test = "value is not _ABSENT"
        lines += [
            f"    if {test}:",
            "        kind = value.__class__",
            f"        add({head!r} + (_esc(value) if kind is str else _int(value) if kind is int"
            " else _value(value)))",
        ]
    lines.append('    return "{" + ",".join(parts) + "}"')
    namespace: dict[str, Any] = {
        "_ABSENT": _ABSENT,
        "_value": _value,
        "_esc": encode_basestring_ascii,
        "_int": int.__repr__,
    }
    # The source is built above from the key names only.
    exec(codecache.compiled("\n".join(lines)), namespace)
    made: Callable[[dict[str, Any], int | None, str | None], str] = namespace["dict_text"]
    return made


_closed_text: Callable[[dict[str, Any], int | None, str | None], str] | None = None


def event_text(body: dict[str, Any], seq: int | None, prev: str | None) -> str | None:
    """``canonical(body)`` with ``seq`` and ``prev`` set (unless None) for a dict whose keys are all
    in :data:`CLOSED_KEYS` (None for any other: the caller uses the general encoder). Compiled at
    the first event."""
    global _closed_text
    if body.keys() <= CLOSED_KEYS:
        if _closed_text is None:
            _closed_text = _compile_dict(CLOSED_KEYS)
        return _closed_text(body, seq, prev)
    return None
