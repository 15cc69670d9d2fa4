"""Both adapters that read a tunnel's first bytes (the front end and mitmproxy's layer chooser)
wait for a hello sent a byte at a time at a cost linear in its size: the bytes buffered are grown
in place and each read is looked at once, instead of the whole buffer being copied or joined again
on every read. Measured in buffers made and events read, never in time."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.proxy import events

from addons import layers as layers_module
from addons import tunnels as tunnels_module
from addons.layers import GateLayers
from addons.tunnels import TunnelFrontEnd
from proxy.core.decision import Decision
from proxy.core.firstbytes import FirstBytes, Protocol, classify
from tests.harness import client_hello


def big_hello() -> bytes:
    """A ~60 KB ClientHello (one large unknown extension) in 16 KiB records."""
    extension = b"\x00" * (60 * 1024)
    hello = client_hello("pypi.org", struct.pack("!HH", 0xFFAA, len(extension)) + extension)
    handshake = hello[5:]
    return b"".join(
        b"\x16\x03\x01"
        + struct.pack("!H", len(handshake[i : i + 16384]))
        + handshake[i : i + 16384]
        for i in range(0, len(handshake), 16384)
    )


class Buffers:
    """Wraps ``classify`` to count the bytes of every distinct buffer it is handed: a new buffer
    per read (bytes joined again) adds up to the square of the hello's size."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.seen: dict[int, object] = {}  # kept alive, so ids are not reused
        self.copied = 0

    def __call__(self, port: int | None, data: Any, *rest: Any) -> FirstBytes:
        if id(data) not in self.seen:
            self.seen[id(data)] = data
            self.copied += len(data)
        result: FirstBytes = self.real(port, data, *rest)
        return result


def test_the_front_end_grows_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    data = big_hello()
    counting = Buffers(classify)
    monkeypatch.setattr(tunnels_module, "classify", counting)
    dribble = iter(data[i : i + 1] for i in range(len(data)))

    class OneByteAtATime:
        async def _recv(self, *args: Any) -> bytes:
            return next(dribble)

    got, classified = asyncio.run(
        TunnelFrontEnd._first_bytes(OneByteAtATime(), None, None, 443, b"", None)  # type: ignore[arg-type]
    )
    assert classified.protocol is Protocol.TLS and classified.sni == "pypi.org"
    assert got == data
    assert counting.copied <= 2 * len(data), counting.copied


class CountingEvents(list[Any]):
    """A NextLayer's event list that counts the events read out of it."""

    read = 0

    def __iter__(self) -> Any:
        for event in super().__iter__():
            self.read += 1
            yield event

    def __getitem__(self, key: Any) -> Any:
        out = super().__getitem__(key)
        self.read += len(out) if isinstance(key, slice) else 1
        return out


class FakeNextLayer:
    """What the layer chooser reads of mitmproxy's NextLayer for a tunnel's first bytes."""

    def __init__(self) -> None:
        self.client = object()
        self.context = SimpleNamespace(
            client=self.client, server=SimpleNamespace(address=("10.0.0.1", 443)), layers=[1, 2]
        )
        self.events = CountingEvents()
        self.layer: Any = None

    def data_client(self) -> bytes:  # as mitmproxy's: every event joined again
        return b"".join(
            e.data
            for e in self.events
            if isinstance(e, events.DataReceived) and e.connection == self.client
        )


def test_the_layer_chooser_reads_each_event_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = big_hello()
    tunnel = Decision.__new__(Decision)
    object.__setattr__(tunnel, "port", 443)
    gate = SimpleNamespace(tunnel_of=lambda client: tunnel)
    chooser = GateLayers(gate)  # type: ignore[arg-type]
    counting = Buffers(classify)
    monkeypatch.setattr(layers_module, "classify", counting)
    nextlayer = FakeNextLayer()
    for i in range(len(data) - 1):  # every read but the last: the hello is never complete
        nextlayer.events.append(events.DataReceived(nextlayer.client, data[i : i + 1]))  # type: ignore[arg-type]
        chooser.next_layer(nextlayer)  # type: ignore[arg-type]
        assert nextlayer.layer is None
    assert nextlayer.events.read <= 2 * len(data), nextlayer.events.read
    assert counting.copied <= 2 * len(data), counting.copied
