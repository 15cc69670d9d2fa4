"""A decision written field by field is byte for byte the general canonical encoder's text of its record,
so journals written before and after keep one format and ``egress audit verify`` recomputes the same
hashes."""

from __future__ import annotations

import dataclasses
import io
import json
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter, JsonLineSink
from proxy.evidence.journal.chain import canonical, record_hash, render
from proxy.evidence.journal.verify import verify
from proxy.evidence.journal.writer import Journal
from proxy.evidence.record import connection_closed, decision_record
from proxy.evidence.record_json import CLOSED_KEYS, decision_text, event_text
from proxy.evidence.serialised import serialise_decision, serialise_event
from tests.proxy.evidence.decisions import allow, deny_http


class Level(IntEnum):
    ONE = 1


HOSTILE_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])) | (
    st.sampled_from(
        [
            'evil\n{"seq":99,"forged":true}\r\x00',
            '","hash":"',
            "\u2028é\x7f\x1b[2J",
            "\ud800",  # a lone surrogate: escaped, as the general encoder does
            "𝄞",
        ]
    )
)
NUMBERS = st.integers() | st.floats() | st.sampled_from([-0.0, 1e16, 1e-7, 2**64, Level.ONE, True])
# Any JSON-ish value, and some that are not (the encoder's default writes their str()).
ODD = (
    st.none()
    | HOSTILE_TEXT
    | NUMBERS
    | st.sampled_from([Kind.DNS, Verdict.DENY, b"bytes", object, MappingProxyType({"k": "v"})])
    | st.tuples(HOSTILE_TEXT, HOSTILE_TEXT)
    | st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT | NUMBERS, max_size=3)
    | st.lists(HOSTILE_TEXT | NUMBERS | st.none(), max_size=3)
)
ENUMS = {"decision": Verdict, "reason": Reason, "kind": Kind}
FIELDS = [f.name for f in dataclasses.fields(Decision)]


@st.composite
def decisions(draw: st.DrawFn) -> Decision:
    values: dict[str, Any] = {}
    for name in FIELDS:
        if name in ENUMS:
            values[name] = draw(st.sampled_from(list(ENUMS[name])))
        elif name in ("id", "ts"):
            values[name] = draw(
                st.just(None) | (HOSTILE_TEXT if name == "id" else NUMBERS) | ODD, label=name
            )
        else:
            values[name] = draw(st.none() | HOSTILE_TEXT | ODD, label=name)
    return Decision(**values)


def _general(decision: Decision, seq: int | None, prev: str | None) -> str:
    record = decision_record(decision)
    if seq is not None:
        record["seq"] = seq
    if prev is not None:
        record["prev"] = prev
    return canonical(record)


@settings(max_examples=400)
@given(
    decision=decisions(),
    seq=st.none() | st.integers(min_value=1),
    prev=st.none() | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64) | HOSTILE_TEXT,
)
def test_a_decision_is_written_as_the_general_encoder_writes_its_record(
    decision: Decision, seq: int | None, prev: str | None
) -> None:
    assert decision_text(decision, seq, prev) == _general(decision, seq, prev)


def test_the_decisions_the_gate_makes_are_written_the_same() -> None:
    for d in (allow(), deny_http(), allow(context={"task": "T-1"}, argv=("a", "b"), pid=7)):
        assert decision_text(d, 3, "0" * 64) == _general(d, 3, "0" * 64)
        assert serialise_decision(d).line() == (canonical(decision_record(d)) + "\n").encode()


def test_control_characters_never_reach_the_line() -> None:
    """Threat 15: a hostile host or path cannot start a line of its own."""
    d = allow(host='evil\n{"seq":1}\r\x00\u2028', path="/\x1b[2J\n")
    text = decision_text(d, 1, "0" * 64)
    assert text.isascii() and "\n" not in text and "\r" not in text and "\x1b" not in text
    assert json.loads(text)["host"] == d.host


@settings(max_examples=50)
@given(decision=decisions())
def test_the_journal_line_is_what_the_verifier_recomputes(
    tmp_path_factory: Any, decision: Decision
) -> None:
    path: Path = tmp_path_factory.mktemp("j") / "audit.jsonl"
    journal = Journal(path, fsync="never")
    Emitter([JsonLineSink(stream=io.StringIO())], write_ahead=[journal]).emit(decision)
    journal.close()
    body = {**decision_record(decision), "seq": 1, "prev": "0" * 64}
    assert path.read_bytes() == render(body, record_hash(body)).encode("ascii")
    assert verify([path]).ok


@settings(max_examples=300)
@given(
    body=st.dictionaries(
        st.sampled_from(sorted(CLOSED_KEYS)) | st.sampled_from(["seq", "prev", "hash", "other"]),
        ODD,
    ),
    seq=st.none() | st.integers(min_value=1),
    prev=st.none() | HOSTILE_TEXT,
)
def test_an_event_is_written_as_the_general_encoder_writes_it(
    body: dict[str, Any], seq: int | None, prev: str | None
) -> None:
    text = event_text(body, seq, prev)
    if not body.keys() <= CLOSED_KEYS:
        assert text is None
        return
    expected = dict(body)
    if seq is not None:
        expected["seq"] = seq
    if prev is not None:
        expected["prev"] = prev
    assert text == canonical(expected)


def test_a_connection_closed_event_takes_the_compiled_path() -> None:
    name, fields = connection_closed(
        allow(host="evil\n{}"), bytes_out=1, bytes_in=2, duration=float("nan")
    )
    body = {**fields, "event": name}
    assert event_text(body, 7, "0" * 64) == canonical({**body, "seq": 7, "prev": "0" * 64})
    shared = serialise_event(name, fields)
    assert shared is not None
    assert shared.line() == (canonical(body) + "\n").encode()
    assert shared.chained(7, "0" * 64) == canonical({**body, "seq": 7, "prev": "0" * 64}).encode()
