"""A record's OTel attributes, severity and body, named as :data:`proxy.evidence.record.ATTRIBUTE_NAMES`
says and scrubbed on the way (:mod:`proxy.evidence.otel.scrub`).

Decisions and events go through the same mapping, so a fact has one attribute name whichever event
carries it. Attributes come out in the table's order whatever the order of the record's keys, so an
event exported from the journal is the same as one exported in-process.
"""

from __future__ import annotations

from typing import Any

from proxy.evidence.otel.scrub import MAX_PATH, scrub_host, scrub_text, scrub_url
from proxy.evidence.record import ATTRIBUTE_NAMES, DECISION_EVENT, NOT_ATTRIBUTES, Record

_TEXT, _NUMBER, _HOST, _PATH, _QUERY, _LIST, _MAP = range(7)
_SHAPE = {"port": _NUMBER, "seq": _NUMBER, "bytes_out": _NUMBER, "bytes_in": _NUMBER,
          "duration": _NUMBER, "host": _HOST, "path": _PATH, "query": _QUERY,
          "pid": _NUMBER, "host_pid": _NUMBER, "ppid": _NUMBER,
          "argv": _LIST, "parents": _LIST, "context": _MAP}  # fmt: skip
MAX_LIST = 64  # items of a list attribute (argv is bounded before it gets here too)
_TABLE = tuple((field, name, _SHAPE.get(field, _TEXT)) for field, name in ATTRIBUTE_NAMES.items())
_KNOWN = NOT_ATTRIBUTES | ATTRIBUTE_NAMES.keys()
_PROTOCOL_NAME = {"connect": "http", "http": "http", "request": "http", "dns": "dns", "tls": "tls"}


_Plan = tuple[tuple[str, str, int], ...]
_PLANS: dict[tuple[str, ...], _Plan] = {}  # the table's entries a record of these keys holds
_MAX_PLANS = 256  # records come in a handful of shapes; emptied whole when full


def _plan(keys: tuple[str, ...]) -> _Plan:
    plan = _PLANS.get(keys)
    if plan is None:
        present = set(keys)
        plan = tuple(entry for entry in _TABLE if entry[0] in present)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[keys] = plan
    return plan


def attributes(record: Record) -> dict[str, Any]:
    """The attributes of a decision or event record (``Decision.to_dict()``, an event's fields, or a
    journal line)."""
    out: dict[str, Any] = {}
    get = record.get
    for field, name, shape in _plan(tuple(record)):  # the table's order, its fields present only
        value = record[field]
        if value is None:
            continue
        if shape == _TEXT:
            out[name] = scrub_text(value)
        elif shape == _NUMBER:
            if isinstance(value, int | float):
                out[name] = value
        elif shape == _HOST:
            out[name] = scrub_host(value)
        elif shape == _QUERY:
            out[name] = scrub_text(value, MAX_PATH)
        elif shape == _LIST:
            if isinstance(value, list | tuple):
                out[name] = [scrub_text(item) for item in value[:MAX_LIST]]
        elif shape == _MAP:
            if isinstance(value, dict):
                for key, item in list(value.items())[:MAX_LIST]:
                    out[f"{name}.{scrub_text(key, 64)}"] = scrub_text(item)
        else:
            out[name], query = scrub_url(str(value))
            if query is not None:
                out["url.query"] = query
    kind = get("kind")
    if kind == "dns" and "server.address" in out:
        out["dns.question.name"] = out["server.address"]
    if kind in _PROTOCOL_NAME:
        out["network.protocol.name"] = _PROTOCOL_NAME[kind]
    # Decisions hold table fields only (a test keeps Decision so); other events may carry keys
    # outside the table (as journals of earlier versions do), which keep their names.
    if get("event", DECISION_EVENT) != DECISION_EVENT and not record.keys() <= _KNOWN:
        for key, value in record.items():
            if key in _KNOWN or value is None:
                continue
            name = scrub_text(key, 64)
            if isinstance(value, bool | int | float):
                out[name] = value
            else:
                out[name] = scrub_host(value) if name == "server.address" else scrub_text(value)
    return out


def is_allow(record: Record) -> bool:
    return record.get("decision") == "allow"


def decision_body(attrs: dict[str, Any]) -> str:
    """One readable line for collectors that show only the body."""
    return (
        f"{attrs.get('egress.decision', '?')} {attrs.get('egress.kind', '?')} "
        f"{attrs.get('server.address', '?')}:{attrs.get('server.port', '-')} "
        f"({attrs.get('egress.reason', '?')})"
    )
