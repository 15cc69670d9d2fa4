"""Literal addresses are screened as a pure function of the address and the opened ranges: asked
again (a kept-alive connection asks on every request) the answer is the same, and a policy that
opens or closes a range is answered anew at once."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest

from proxy.core.decision import Reason
from proxy.core.destination import DestinationCheck, DestinationRefused, literal_destination

LOOPBACK: tuple[IPv4Network | IPv6Network, ...] = (ip_network("127.0.0.0/8"),)


def test_a_literal_asked_again_gets_the_same_answer() -> None:
    first = literal_destination(ip_address("203.0.113.7"), 80, ())
    again = literal_destination(ip_address("203.0.113.7"), 80, ())
    assert first == again
    assert (first.host, first.port, first.address, first.addresses) == (
        "203.0.113.7",
        80,
        "203.0.113.7",
        ("203.0.113.7",),
    )
    assert literal_destination(ip_address("203.0.113.7"), 8080, ()).port == 8080


def test_opening_and_closing_a_range_is_answered_at_once() -> None:
    loopback = ip_address("127.0.0.1")
    for _ in range(2):  # and again, from whatever was remembered
        with pytest.raises(DestinationRefused) as refused:
            literal_destination(loopback, 80, ())
        assert refused.value.reason is Reason.INTERNAL_ADDRESS
        assert refused.value.address == "127.0.0.1"
        assert "internal address" in refused.value.detail
        assert literal_destination(loopback, 80, LOOPBACK).address == "127.0.0.1"
        assert literal_destination(loopback, 80, list(LOOPBACK)).address == "127.0.0.1"


def test_each_refusal_is_raised_afresh() -> None:
    raised = []
    for _ in range(2):
        with pytest.raises(DestinationRefused) as refused:
            literal_destination(ip_address("169.254.169.254"), 80, ())
        raised.append(refused.value)
    assert raised[0] is not raised[1]
    assert raised[0].detail == raised[1].detail


def test_an_ipv4_mapped_literal_connects_as_its_ipv4_and_is_screened_as_it() -> None:
    mapped = ip_address("::ffff:127.0.0.1")
    with pytest.raises(DestinationRefused):
        literal_destination(mapped, 80, ())
    assert literal_destination(mapped, 80, LOOPBACK).address == "127.0.0.1"


def test_the_destination_check_screens_literals_without_a_resolver() -> None:
    check = DestinationCheck(None)
    found = asyncio.run(check.destination("203.0.113.9", 443, ()))
    assert found.address == "203.0.113.9"
    with pytest.raises(DestinationRefused):
        asyncio.run(check.destination("10.1.2.3", 443, ()))
