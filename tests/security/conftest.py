"""Counting upstreams shared by the attack modules. Module scope: each module gets its own instance,
so one module's traffic never shows up in another module's counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import LocalCA, Upstream, serving


@pytest.fixture(scope="module")
def plain() -> Iterator[Upstream]:
    yield from serving(Upstream("plain"))


@pytest.fixture(scope="module")
def tls(test_ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("tls", tls=test_ca.server_context()))
