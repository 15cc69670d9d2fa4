"""The tunnel's first bytes: a table of what each port accepts, the ClientHello parser against real
hellos (and against mitmproxy's own parser), and properties that no input makes it raise."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.tls import parse_client_hello

from proxy.core.decision import Reason
from proxy.core.firstbytes import (
    ECH_EXTENSION,
    MAX_CLIENT_HELLO,
    MAX_HELLO_RECORDS,
    FirstBytes,
    Protocol,
    classify,
)
from proxy.core.hosts import InvalidHost, canonical_host
from tests.harness import client_hello

HELLO = client_hello("pypi.org")


def records(handshake: bytes, size: int) -> bytes:
    """``handshake`` split into TLS handshake records of ``size`` bytes."""
    return b"".join(
        b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
        for chunk in (handshake[i : i + size] for i in range(0, len(handshake), size))
    )


def test_a_real_hello_names_its_server() -> None:
    assert classify(443, HELLO) == FirstBytes(Protocol.TLS, sni="pypi.org")


def test_a_hello_without_sni() -> None:
    assert classify(443, client_hello(None)) == FirstBytes(Protocol.TLS)


@pytest.mark.parametrize("cut", [1, 2, 4, 5, 9, 60, len(HELLO) - 1])
def test_a_partial_hello_waits(cut: int) -> None:
    assert classify(443, HELLO[:cut]).protocol is Protocol.WAIT


def test_a_hello_split_over_records_is_reassembled() -> None:
    handshake = HELLO[5:]
    assert classify(443, records(handshake, 100)).sni == "pypi.org"


def refused(port: int | None, data: bytes) -> tuple[Reason | None, str]:
    result = classify(port, data)
    assert result.protocol is Protocol.REFUSE, result
    return result.reason, result.detail


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "must start with TLS"),
        (b"SSH-2.0-x\r\n", "must start with TLS"),
        (b"\x80\x2e\x01\x00\x02", "must start with TLS"),  # SSLv2-style hello
        (b"\x17\x03\x03\x00\x10" + b"\x00" * 16, "must start with TLS"),  # application data
        (b"\x16\x04", "must start with TLS"),
        (b"\x16\x03\x01\x00\x00", "record length 0"),
        (b"\x16\x03\x01\x40\x01", "record length 16385"),
        (b"\x16\x03\x01\x00\x05hello", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),  # ServerHello
    ],
)
def test_non_tls_first_bytes_are_refused(data: bytes, detail: str) -> None:
    reason, text = refused(443, data)
    assert reason is Reason.NOT_TLS and detail in text


def test_an_oversized_hello_is_refused_from_its_header_alone() -> None:
    """Nine bytes announce 64 KiB + 3: refused at once, never buffered (no waiting for the rest)."""
    head = b"\x16\x03\x01\x40\x00\x01\x00\xff\xff"
    reason, detail = refused(443, head)
    assert reason is Reason.NOT_TLS and "oversized" in detail
    assert MAX_CLIENT_HELLO < 4 + 0xFFFF


def test_a_hello_spread_over_too_many_records_is_refused() -> None:
    reason, detail = refused(443, records(HELLO[5:], 8))
    assert reason is Reason.NOT_TLS and str(MAX_HELLO_RECORDS) in detail


@pytest.mark.parametrize("tail", [0, 1, 40], ids=["hello-alone", "one-more-byte", "more"])
def test_a_record_announcing_more_than_its_hello_is_refused_before_the_rest_comes(
    tail: int,
) -> None:
    """A record whose header announces the hello and a second ClientHello, read while only the
    first hello (and ``tail`` bytes of the second) has come: what follows would go on to the server
    as part of the hello, so the header alone refuses it."""
    first, second = HELLO[5:], client_hello("evil.test")[5:]
    record = b"\x16\x03\x01" + struct.pack("!H", len(first) + len(second)) + first + second
    reason, detail = refused(443, record[: 5 + len(first) + tail])
    assert reason is Reason.NOT_TLS and "more handshake bytes in its record" in detail


def test_a_hello_in_records_announcing_exactly_it_waits_for_them() -> None:
    """Control: a hello split over records that announce no more than it waits for the last one."""
    split = records(HELLO[5:], 100)
    assert classify(443, split[:-1]).protocol is Protocol.WAIT
    assert classify(443, split).sni == "pypi.org"


def with_extension(kind: int, value: bytes) -> bytes:
    return client_hello("pypi.org", struct.pack("!HH", kind, len(value)) + value)


def test_encrypted_client_hello_is_refused() -> None:
    reason, _ = refused(443, with_extension(ECH_EXTENSION, b"\x00" * 8))
    assert reason is Reason.ECH_REFUSED


def test_a_second_server_name_extension_is_refused() -> None:
    name = b"evil.test"
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    reason, detail = refused(443, with_extension(0, struct.pack("!H", len(entry)) + entry))
    assert reason is Reason.NOT_TLS and "appears twice" in detail


def test_a_server_name_with_control_bytes_is_refused() -> None:
    name = b"\x00ypi.org"
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    body = struct.pack("!H", len(entry)) + entry
    reason, detail = refused(443, client_hello(None, struct.pack("!HH", 0, len(body)) + body))
    assert reason is Reason.NOT_TLS and "printable" in detail


def test_two_names_in_one_server_name_list_are_refused() -> None:
    names = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in (b"a.test", b"b.test"))
    body = struct.pack("!H", len(names)) + names
    hello = client_hello(None, struct.pack("!HH", 0, len(body)) + body)
    reason, detail = refused(443, hello)
    assert reason is Reason.NOT_TLS and "more than one server name" in detail


@pytest.mark.parametrize(
    ("data", "protocol"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", Protocol.SSH),
        (b"SSH", Protocol.WAIT),
        (b"S", Protocol.WAIT),
    ],
)
def test_port_22_carries_ssh(data: bytes, protocol: Protocol) -> None:
    assert classify(22, data).protocol is protocol


@pytest.mark.parametrize("data", [HELLO, b"GET / HTTP/1.1\r\n", b"\x00" * 8, b"SSX"])
def test_port_22_refuses_anything_else(data: bytes) -> None:
    reason, detail = refused(22, data)
    assert reason is Reason.NOT_TLS and "SSH" in detail


def test_port_80_is_http_whatever_it_starts_with() -> None:
    assert classify(80, b"GET / HTTP/1.1\r\n").protocol is Protocol.HTTP
    assert classify(80, HELLO).protocol is Protocol.HTTP  # the HTTP layer then refuses it


def test_nothing_yet_waits() -> None:
    assert classify(443, b"").protocol is Protocol.WAIT


@pytest.mark.parametrize("name", ["pypi.org", "a.b.c.example.test", "xn--bcher-kva.example", None])
def test_agrees_with_mitmproxys_parser_on_real_hellos(name: str | None) -> None:
    hello = client_hello(name)
    ours = classify(443, hello)
    theirs = parse_client_hello(hello)
    assert theirs is not None
    assert ours.protocol is Protocol.TLS
    assert ours.sni == theirs.sni
    assert list(ours.alpn) == list(theirs.alpn_protocols)


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=1, max_value=65535), st.binary(max_size=600))
def test_classify_never_raises(port: int, data: bytes) -> None:
    result = classify(port, data)
    assert (result.protocol is Protocol.REFUSE) == (result.reason is not None)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=5, max_value=400), st.binary(min_size=1, max_size=40))
def test_a_mutated_hello_we_accept_is_one_mitmproxy_reads_the_same(
    position: int, garbage: bytes
) -> None:
    """Differential: whatever this parser accepts, mitmproxy's parser (which the relay's peers are
    closer to) reads as a ClientHello with the same server name. Being stricter is allowed."""
    mutated = HELLO[:position] + garbage + HELLO[position + len(garbage) :]
    ours = classify(443, mutated)
    if ours.protocol is not Protocol.TLS:
        return
    theirs = parse_client_hello(mutated)
    assert theirs is not None
    if theirs.sni != ours.sni:  # mitmproxy drops names it finds invalid; the engine refuses them
        assert ours.sni is not None and theirs.sni is None
        with pytest.raises(InvalidHost):
            canonical_host(ours.sni)


class CountingBytes(bytes):
    """Bytes that count how many bytes are read out of them (indexing and slicing), so the cost of
    classifying a buffer is measured in bytes read, not in time."""

    read = 0

    def __getitem__(self, key: object) -> object:  # type: ignore[override]
        out = super().__getitem__(key)  # type: ignore[call-overload]
        CountingBytes.read += len(out) if isinstance(out, bytes) else 1
        return out


def big_hello() -> bytes:
    """A ~60 KB ClientHello (one large unknown extension), in 16 KiB records."""
    hello = with_extension(0xFFAA, b"\x00" * (60 * 1024))
    return records(hello[5:], 16 * 1024)


def test_a_hello_sent_a_byte_at_a_time_costs_linear_time() -> None:
    """Every read of a dribbling client classifies the whole buffer again; while the records are
    incomplete that must cost only their headers, so the total is linear in the hello's size
    (re-reading the buffer each time reads ~1.8 GB for this hello)."""
    data = big_hello()
    assert len(data) > 60 * 1024
    CountingBytes.read = 0
    most = 0
    for cut in range(1, len(data)):
        before = CountingBytes.read
        assert classify(443, CountingBytes(data[:cut])).protocol is Protocol.WAIT
        most = max(most, CountingBytes.read - before)
    assert most <= 16 * MAX_HELLO_RECORDS, (
        most
    )  # a few bytes per record header, whatever is buffered
    whole = classify(443, CountingBytes(data))
    assert whole.protocol is Protocol.TLS and whole.sni == "pypi.org" and whole.size == len(data)
    # linear: a bounded cost per read, and the whole hello read about once when it is complete
    assert CountingBytes.read <= (most + 2) * len(data), CountingBytes.read


def test_a_buffer_is_read_in_place_from_an_offset() -> None:
    """The adapters grow one bytearray and the second hello is read after a ChangeCipherSpec:
    both classify as the bytes themselves do."""
    data = records(HELLO[5:], 100)
    for buffer in (bytearray(data), memoryview(data)):
        assert classify(443, buffer) == classify(443, data)
        assert classify(443, buffer).size == len(data)
    shifted = b"\x14\x03\x03\x00\x01\x01" + data
    assert classify(443, shifted, 6) == classify(443, data)
    assert classify(443, shifted, 6).size == len(data)
    assert classify(443, shifted[:-1], 6).protocol is Protocol.WAIT
    assert classify(443, shifted, len(shifted)).protocol is Protocol.WAIT
