"""The server's first bytes tell a HelloRetryRequest from a ServerHello; the client's answer to one is
classified like a first ClientHello (threat 5)."""

from __future__ import annotations

import pytest

from proxy.core.decision import Reason
from proxy.core.firstbytes import Protocol, classify
from proxy.core.helloretry import asks_again, second_hello
from tests.harness import client_hello, server_hello

CCS = b"\x14\x03\x03\x00\x01\x01"
HELLO = client_hello("pypi.org")


@pytest.mark.parametrize("retry", [True, False])
def test_a_server_hello_says_whether_it_asks_again(retry: bool) -> None:
    reply = server_hello(retry=retry)
    assert asks_again(reply) is retry
    assert asks_again(reply + b"\x14\x03\x03\x00\x01\x01") is retry


def test_it_is_known_only_once_the_random_has_come() -> None:
    reply = server_hello(retry=True)
    for cut in range(4 + 5 + 2 + 32):
        assert asks_again(reply[:cut]) is None, cut
    assert asks_again(reply[: 5 + 4 + 2 + 32]) is True


def test_a_server_hello_split_over_records_is_read_whole() -> None:
    reply = server_hello(retry=True)
    body = reply[5:]
    split = b"".join(b"\x16\x03\x03" + len(p).to_bytes(2, "big") + p for p in (body[:7], body[7:]))
    assert asks_again(split) is True


@pytest.mark.parametrize(
    "reply",
    [
        b"\x15\x03\x03\x00\x02\x02\x28",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"\x16\x03\x03\x00\x04\x0b\x00\x00\x00",
    ],
)
def test_anything_but_a_server_hello_first_is_not_a_retry(reply: bytes) -> None:
    assert asks_again(reply) is False


def test_the_second_hello_is_classified_after_change_cipher_spec() -> None:
    second = second_hello(443, CCS + HELLO + b"more")
    assert second.protocol is Protocol.TLS and second.sni == "pypi.org"
    assert second.size == len(CCS) + len(HELLO)
    assert second_hello(443, CCS[:3]).protocol is Protocol.WAIT
    assert second_hello(443, CCS + HELLO[:20]).protocol is Protocol.WAIT
    assert second_hello(443, b"").protocol is Protocol.WAIT


def test_anything_but_a_hello_after_a_retry_is_refused() -> None:
    refused = second_hello(443, CCS + b"\x17\x03\x03\x00\x05hello")
    assert refused.protocol is Protocol.REFUSE and refused.reason is Reason.NOT_TLS


def test_the_first_hello_says_how_many_bytes_it_took() -> None:
    assert classify(443, HELLO + b"after").size == len(HELLO)


def test_a_hello_record_with_more_handshake_bytes_is_refused() -> None:
    record = HELLO[5:] + HELLO[5:]
    coalesced = HELLO[:3] + len(record).to_bytes(2, "big") + record
    refused = classify(443, coalesced)
    assert refused.protocol is Protocol.REFUSE and refused.reason is Reason.NOT_TLS


def test_only_one_change_cipher_spec_comes_before_the_second_hello() -> None:
    refused = second_hello(443, CCS + CCS + HELLO)
    assert refused.protocol is Protocol.REFUSE
