"""The hand-written wire pieces are byte for byte what ``opentelemetry-proto``'s classes write, and the
encoder's caches never hand one value's bytes to another."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from proxy.evidence.otel import wire
from proxy.evidence.otel.encoder import LogEncoder
from proxy.evidence.record import CLOSED_EVENT

texts = st.text(st.characters(exclude_categories=["Cs"]))  # no lone surrogates: not UTF-8
keys = texts.filter(bool)
int64s = st.integers(min_value=wire.INT64_MIN, max_value=wire.INT64_MAX)


@settings(max_examples=400)
@given(key=keys, value=st.one_of(texts, int64s, st.booleans(), st.floats(allow_nan=False)))
def test_a_key_value_is_written_as_the_library_writes_it(
    key: str, value: str | int | bool | float
) -> None:
    if isinstance(value, bool):
        ours, theirs = wire.bool_value(value), AnyValue(bool_value=value)
    elif isinstance(value, int):
        ours, theirs = wire.int_value(value), AnyValue(int_value=value)
    elif isinstance(value, float):
        ours, theirs = wire.double_value(value), AnyValue(double_value=value)
    else:
        ours, theirs = wire.string_value(value), AnyValue(string_value=value)
    expected = KeyValue(key=key, value=theirs).SerializeToString()
    assert wire.key_prefix(key) + ours == expected


@settings(max_examples=300)
@given(number=st.integers(min_value=1, max_value=2**64 - 1))  # proto3 leaves zeros out
def test_fixed_fields_and_varints_are_the_library_s(number: int) -> None:
    assert wire.fixed64(1, number) == LogRecord(time_unix_nano=number).SerializeToString()
    assert wire.fixed64(11, number) == LogRecord(observed_time_unix_nano=number).SerializeToString()
    if number < 2**32:
        count = LogRecord(dropped_attributes_count=number).SerializeToString()
        assert wire.varint_field(7, number) == count
        assert wire.fixed32(8, number) == LogRecord(flags=number).SerializeToString()


def test_values_outside_their_type_are_refused_like_the_library() -> None:
    with pytest.raises(ValueError):
        wire.int_value(2**63)
    with pytest.raises(ValueError):
        AnyValue(int_value=2**63)
    with pytest.raises(ValueError):  # a lone surrogate is not UTF-8
        wire.string_value("\ud800")
    with pytest.raises(struct.error):  # a negative time does not fit fixed64
        wire.fixed64(1, -1)
    assert math.isnan(
        AnyValue.FromString(wire.double_value(math.nan)[2:]).double_value
    )  # the length-delimited value parses back


def _attributes(encoder: LogEncoder, records: list[dict[str, object]]) -> list[dict[str, object]]:
    request = encoder.encode([json.loads(json.dumps(r)) for r in records]).request
    out = []
    for rec in request.resource_logs[0].scope_logs[0].log_records:
        out.append(
            {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in rec.attributes}
        )
    return out


def test_equal_values_of_different_types_keep_their_own_encoding() -> None:
    """1, True and 1.0 are equal (and hash alike) in Python: a cache keyed by value alone would
    send the first one's bytes for all three."""
    encoder = LogEncoder("1")
    got = _attributes(
        encoder,
        [{"ts": 1.0, "event": CLOSED_EVENT, "x": v} for v in (1, True, 1.0, "1", 1, True)],
    )
    values = [a["x"] for a in got]
    assert values == [1, True, 1.0, "1", 1, True]
    assert [type(v) for v in values] == [int, bool, float, str, int, bool]


def test_the_caches_stay_bounded_and_correct_past_their_size() -> None:
    encoder = LogEncoder("1")
    encoder.CACHE = 8
    records: list[dict[str, object]] = [
        {"ts": 1.0, "event": CLOSED_EVENT, "k": f"v{i % 13}", "n": i % 11} for i in range(100)
    ]
    got = _attributes(encoder, records)
    assert [(a["k"], a["n"]) for a in got] == [(r["k"], r["n"]) for r in records]
    assert len(encoder._attribute_fields) <= 8


def test_a_record_in_a_trace_carries_its_ids_and_the_sampled_flag() -> None:
    trace, span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    encoder = LogEncoder("1")
    records = [
        {"ts": 1.0, "event": CLOSED_EVENT, "trace_id": trace, "span_id": span},
        {"ts": 1.0, "event": CLOSED_EVENT, "trace_id": "zz", "span_id": span},  # malformed
    ]
    request = encoder.encode(records).request
    good, bad = request.resource_logs[0].scope_logs[0].log_records
    assert (good.trace_id.hex(), good.span_id.hex(), good.flags) == (trace, span, 1)
    assert (bad.trace_id, bad.span_id, bad.flags) == (b"", b"", 0)
