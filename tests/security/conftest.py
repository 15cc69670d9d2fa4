"""Counting upstreams shared by the attack modules. Module scope: each module gets its own instance,
so one module's traffic never shows up in another module's counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import LocalCA, Upstream


@pytest.fixture(scope="module")
def plain() -> Iterator[Upstream]:
    server = Upstream("plain")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls(test_ca: LocalCA) -> Iterator[Upstream]:
    server = Upstream("tls", tls=test_ca.server_context())
    yield server
    server.stop()
