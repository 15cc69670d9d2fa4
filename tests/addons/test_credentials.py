"""The trailers of a bound host's response (``addons/credentials.scrub_trailers``): scrubbed, or
dropped when they cannot be; the real gate's path is in ``tests/security/test_credentials.py``."""

from __future__ import annotations

from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow

from addons.credentials import SCRUB, scrub_trailers

REAL = "ghp_R3alValue0123456789"
PLACEHOLDER = "egress-placeholder-0001"


class _Vault:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def credentials(self) -> Any:
        raise AssertionError("not used for trailers")

    def value(self, name: str) -> str:
        raise AssertionError("not used for trailers")

    def scrub_pairs(self, sandbox_id: str | None) -> list[tuple[str, str]]:
        if self.broken:
            raise RuntimeError("the credential store is gone")
        return [(REAL, PLACEHOLDER)]


def _flow(scrubbed: bool) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    assert flow.response is not None
    flow.response.trailers = http.Headers(
        [(b"grpc-status", b"16"), (b"grpc-message", f"rejected Bearer {REAL}".encode())]
    )
    if scrubbed:
        flow.metadata[SCRUB] = True
    return flow


def test_a_bound_hosts_trailers_carry_the_placeholder_not_the_value() -> None:
    flow = _flow(scrubbed=True)
    scrub_trailers(flow, _Vault(), None)
    assert flow.response is not None and flow.response.trailers is not None
    assert flow.response.trailers.fields == (
        (b"grpc-status", b"16"),
        (b"grpc-message", f"rejected Bearer {PLACEHOLDER}".encode()),
    )


def test_trailers_that_cannot_be_scrubbed_are_dropped() -> None:
    flow = _flow(scrubbed=True)
    scrub_trailers(flow, _Vault(broken=True), None)
    assert flow.response is not None
    assert not flow.response.trailers


def test_another_hosts_trailers_are_left_as_they_came() -> None:
    flow = _flow(scrubbed=False)
    scrub_trailers(flow, _Vault(broken=True), None)  # not even asked for its pairs
    assert flow.response is not None and flow.response.trailers is not None
    assert flow.response.trailers[b"grpc-message"] == f"rejected Bearer {REAL}"
