"""Property tests of the hand-written OTLP encoding: whatever a record holds (hostile hosts, paths,
argv, context values; lengths on the varint boundaries; values equal across types such as 1, True,
1.0 and "1"), the bytes parse back to the message the SDK's logs API and encoder send."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as PbLogRecord

from proxy.evidence.otel import wire
from proxy.evidence.otel.attributes import _KNOWN
from proxy.evidence.otel.encoder import LogEncoder, any_value
from proxy.evidence.record import CLOSED_EVENT, DECISION_EVENT
from tests.proxy.evidence.otel.test_encoder import _sdk_request, _without_observed_time

# lengths either side of one- and two-byte varints, in characters of one to four UTF-8 bytes
_LENGTHS = [0, 1, 31, 32, 41, 42, 62, 63, 125, 126, 127, 128, 129, 255, 256, 257, 300, 1100]
_CHARS = ["a", "\u00e9", "\u20ac", "\U0001f600", "\x00", "\n", "\u2028", "\ud800"]
_EQUAL_ACROSS_TYPES: list[Any] = [1, True, 1.0, "1", 0, False, 0.0, -0.0, "", "True", None]
_INT64 = st.integers(-(2**63), 2**63 - 1)
_BOUNDARY_INTS = st.sampled_from(
    [
        n + d
        for n in (0, 2**7, 2**14, 2**21, 2**31, 2**32, 2**35, 2**63 - 1, -(2**63))
        for d in (-1, 0, 1)
    ]
).filter(lambda n: -(2**63) <= n <= 2**63 - 1)


def _boundary_text() -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(_CHARS), st.sampled_from(_LENGTHS))


_TEXT = st.one_of(st.text(max_size=40), _boundary_text())
_SCALAR: st.SearchStrategy[Any] = st.one_of(
    _TEXT,
    _INT64,
    _BOUNDARY_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(_EQUAL_ACROSS_TYPES),
)
_KEYS = st.one_of(
    st.sampled_from(["k", "x.y", "long" * 20, "\u00e9t\u00e9", ""]),
    st.text(min_size=1, max_size=20).filter(lambda k: k not in _KNOWN),
)


def _wire_key_value(key: str, value: Any) -> KeyValue:
    record = PbLogRecord.FromString(
        wire.length_delimited(6, LogEncoder._key_value(_ENCODER, key, value, None))
    )
    assert len(record.attributes) == 1
    kv: KeyValue = record.attributes[0]
    return kv


_ENCODER = LogEncoder("0")


@settings(max_examples=400, deadline=None)
@given(key=st.text(min_size=1, max_size=200), value=_SCALAR)
def test_one_key_value_is_what_protobuf_writes(key: str, value: Any) -> None:
    try:
        expected = KeyValue(key=key, value=any_value(value)).SerializeToString(deterministic=True)
    except (ValueError, UnicodeEncodeError):  # lone surrogates: the library refuses them too
        with pytest.raises(ValueError):
            _wire_key_value(key, value)
        return
    got = _wire_key_value(key, value)
    assert got.SerializeToString(deterministic=True) == expected


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 16383, 16384, 16385, 2**21, 2**63 - 1])
def test_varints_on_their_boundaries(n: int) -> None:
    kv = KeyValue.FromString(wire.key_prefix("k") + wire.int_value(n))
    assert kv.value.int_value == n
    assert kv.value.WhichOneof("value") == "int_value"


def _records() -> st.SearchStrategy[list[dict[str, Any]]]:
    attrs = st.dictionaries(_KEYS, _SCALAR | st.lists(_TEXT, max_size=3), max_size=6)
    record = st.builds(
        lambda ts, event, a, host, ctx: {
            "ts": ts,
            "event": event,
            "host": host,
            "context": ctx,
            **a,
        },
        st.floats(0, 4e9).filter(lambda t: not math.isnan(t)),
        st.sampled_from([CLOSED_EVENT, "egress.custom", "x" * 80]),
        attrs,
        _TEXT,
        st.dictionaries(st.sampled_from(["a", "b", "\u00e9"]), _TEXT, max_size=3),
    )
    return st.lists(record, min_size=1, max_size=6)


@pytest.mark.filterwarnings("ignore:Log record attributes were dropped")
@pytest.mark.filterwarnings("ignore:Invalid type")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=_records())
def test_random_records_parse_back_to_what_the_sdk_sends(records: list[dict[str, Any]]) -> None:
    """One encoder for the whole batch, so its caches see the same keys with values of different
    types (1, True, 1.0, "1") and strings either side of every length boundary."""
    records = [r for r in records if _sdk_accepts(r)]
    if not records:
        return
    encoder = LogEncoder("9.9.9")
    twice = encoder.encode(records + records)  # the second half from the caches
    assert twice.failed == 0
    expected = _sdk_request(records + records, "9.9.9")
    assert _without_observed_time(twice.request) == _without_observed_time(expected)


def _sdk_accepts(record: dict[str, Any]) -> bool:
    """Strings protobuf cannot encode (lone surrogates) fail the SDK's whole batch; ours drops the
    attribute. Compared only where the SDK sends something."""
    for value in record.values():
        items = (
            value
            if isinstance(value, list)
            else list(value.items())
            if isinstance(value, dict)
            else [value]
        )
        for item in items:
            for text in item if isinstance(item, tuple) else (item,):
                if isinstance(text, str):
                    try:
                        text.encode()
                    except UnicodeEncodeError:
                        return False
    return (
        all(isinstance(k, str) and "\ud800" not in k for k in record)
        and record.get("event") != DECISION_EVENT
    )


@pytest.mark.filterwarnings("ignore:Invalid type")
def test_values_equal_across_types_are_not_confused_by_the_caches() -> None:
    """1 == True == 1.0 and hash alike: each keeps its own type, in any order, under one key."""
    values = [v for v in _EQUAL_ACROSS_TYPES if v is not None]
    records = [
        {"ts": 1.0 + i, "event": CLOSED_EVENT, "k": v, "egress.custom": v}
        for i, v in enumerate(values + values[::-1])
    ]
    got = LogEncoder("9.9.9").encode(records)
    assert _without_observed_time(got.request) == _without_observed_time(
        _sdk_request(records, "9.9.9")
    )
    kinds = [
        r.attributes[0].value.WhichOneof("value")
        for r in got.request.resource_logs[0].scope_logs[0].log_records
    ]
    assert kinds[: len(values)] == [
        {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value"}[type(v)]
        for v in values
    ]


@pytest.mark.filterwarnings("ignore:Log record attributes were dropped")
@pytest.mark.filterwarnings("ignore:Invalid type")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=_records(),
    count=st.sampled_from(["0", "1", "3", "7", ""]),
    length=st.sampled_from(["0", "1", "63", "126", "127", ""]),
)
def test_random_records_under_attribute_limits(
    records: list[dict[str, Any]], count: str, length: str
) -> None:
    records = [r for r in records if _sdk_accepts(r)]
    if not records:
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT", count)
        mp.setenv("OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT", length)
        got = LogEncoder("9.9.9").encode(records + records)
        expected = _sdk_request(records + records, "9.9.9")
    assert got.failed == 0
    assert _without_observed_time(got.request) == _without_observed_time(expected)
