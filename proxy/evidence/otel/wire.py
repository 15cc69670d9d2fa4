"""The few pieces of protobuf's wire format the OTLP export writes itself.

Why by hand: the export process encodes every journal record, and filling ``opentelemetry-proto``'s
messages field by field cost about 16 us a record, most of the export's CPU. A record's attributes
mostly repeat (rule, host, port, policy version, verdict), so their encoded bytes are kept and joined;
that needs only the framing below (varints, fixed-width numbers, length-delimited fields) and the two
shapes of ``KeyValue`` that carry a string or a number. Everything else (the resource, the scope, list
and map attributes) is still serialised by the library, and the tests parse what is written here back
with it and compare it with what the SDK sends.

Field numbers are those of ``opentelemetry/proto/logs/v1/logs.proto`` and ``common/v1/common.proto``.
"""

from __future__ import annotations

import struct

# wire types
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_UINT64 = 2**64

_FIXED64_FIELD = struct.Struct("<BQ")
_DOUBLE = struct.Struct("<d")


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int64 as its two's complement (ten bytes), as protobuf does."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]  # every tag here, and most lengths
    if value < 0:
        value += _UINT64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field ``number`` holding ``payload`` (a string, bytes or an embedded message)."""
    return (
        _ONE_BYTE[number << 3 | _LEN] + varint(len(payload)) + payload
        if number < 16
        else (tag(number, _LEN) + varint(len(payload)) + payload)
    )


def fixed64(number: int, value: int) -> bytes:
    """A ``fixed64`` field with a one-byte tag (field numbers up to 15); struct.error out of range."""
    return _FIXED64_FIELD.pack(number << 3 | _FIXED64, value)


def fixed32(number: int, value: int) -> bytes:
    return tag(number, _FIXED32) + struct.pack("<I", value)


def varint_field(number: int, value: int) -> bytes:
    return tag(number, _VARINT) + varint(value)


# AnyValue (common.proto): string_value = 1, bool_value = 2, int_value = 3, double_value = 4.
# KeyValue: key = 1, value = 2. A oneof member is written even when it holds its default.


def key_prefix(key: str) -> bytes:
    """The ``key`` field of a ``KeyValue`` (empty keys are never encoded: the SDK refuses them)."""
    return length_delimited(1, key.encode())


def string_value(text: str) -> bytes:
    """``KeyValue.value`` holding a string; UnicodeEncodeError (a ValueError) for lone surrogates,
    which the library refuses too."""
    data = text.encode()
    if len(data) < 0x7E:  # both lengths fit one byte: the common case, written at once
        return b"\x12" + _ONE_BYTE[len(data) + 2] + b"\x0a" + _ONE_BYTE[len(data)] + data
    return length_delimited(2, length_delimited(1, data))


def int_value(number: int) -> bytes:
    """``KeyValue.value`` holding an int64; ValueError outside its range, as the library."""
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{number} does not fit an int64")
    return length_delimited(2, varint_field(3, number))


def double_value(number: float) -> bytes:
    return length_delimited(2, tag(4, _FIXED64) + _DOUBLE.pack(number))


def bool_value(flag: bool) -> bytes:
    return length_delimited(2, varint_field(2, int(flag)))
