"""One serialisation of a decision and one builder per event, shared by every sink."""

from __future__ import annotations

import dataclasses
import json
import time

from proxy.core.decision import Decision
from proxy.evidence.record import (
    ATTRIBUTE_NAMES,
    CLOSED_EVENT,
    DECISION_EVENT,
    NOT_ATTRIBUTES,
    connection_closed,
    decision_record,
)
from tests.proxy.evidence.decisions import allow, dns_query


def test_a_decision_record_is_to_dict_with_the_event_name() -> None:
    d = allow()
    assert decision_record(d) == {"event": DECISION_EVENT, **d.to_dict()}
    assert json.loads(json.dumps(decision_record(d)))["decision"] == "allow"


def test_every_decision_field_has_an_attribute_name() -> None:
    """A field added to Decision must be given its OTel attribute here, or it never leaves the host."""
    fields = {f.name for f in dataclasses.fields(Decision)}
    assert fields - ATTRIBUTE_NAMES.keys() - NOT_ATTRIBUTES == set()


def test_connection_closed_names_the_decision_and_its_destination() -> None:
    opened = allow(2)
    before = time.time()
    name, fields = connection_closed(opened, bytes_out=10, bytes_in=2000, duration=0.75)
    assert name == CLOSED_EVENT
    assert before <= fields.pop("ts") <= time.time()
    assert fields == {
        "id": opened.id,
        "kind": "connect",
        "host": "h2.pypi.org",
        "port": 443,
        "rule": "pypi",
        "sandbox_id": "sb-1",
        "client": "127.0.0.1",
        "bytes_out": 10,
        "bytes_in": 2000,
        "duration": 0.75,
    }
    assert set(fields) <= ATTRIBUTE_NAMES.keys()


def test_connection_closed_leaves_out_what_the_decision_does_not_know() -> None:
    _, fields = connection_closed(dns_query(), bytes_out=0, bytes_in=0, duration=0.0)
    assert {"port", "rule", "sandbox_id", "client"}.isdisjoint(fields)
