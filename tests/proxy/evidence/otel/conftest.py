"""The ``receiver`` fixture: a real OTLP receiver on loopback, once over gRPC and once over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.proxy.evidence.otel.receivers import Receiver


@pytest.fixture(params=["grpc", "http"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    rx: Receiver = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()
