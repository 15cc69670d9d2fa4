"""What a bound host sends after its body, and its failures (``addons/credentials``): trailers
scrubbed or dropped, an error text that quotes a value never shown; the real gate's path is in
``tests/security/test_credentials.py``."""

from __future__ import annotations

from typing import Any

from mitmproxy import http
from mitmproxy.flow import Error as FlowError
from mitmproxy.test import tflow

from addons.credentials import SCRUB, scrub_response, scrub_trailers, stop_quoted_error

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


def _failed(quoting: str, scrubbed: bool = True) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.error = FlowError(f"Cannot parse HTTP response: Invalid header line: b'{quoting}'")
    if scrubbed:
        flow.metadata[SCRUB] = True
    return flow


def test_a_bound_hosts_failure_quoting_the_value_ends_the_stream_unshown() -> None:
    flow = _failed(f"broken line Bearer {REAL}")
    stop_quoted_error(flow, _Vault(), None)
    assert flow.error is not None and flow.error.msg == FlowError.KILLED_MESSAGE


def test_a_failure_that_quotes_no_value_is_shown_as_it_is() -> None:
    flow = _failed("broken line")
    stop_quoted_error(flow, _Vault(), None)
    assert flow.error is not None and "broken line" in flow.error.msg


def test_a_failure_that_cannot_be_checked_is_not_shown() -> None:
    flow = _failed("broken line")
    stop_quoted_error(flow, _Vault(broken=True), None)
    assert flow.error is not None and flow.error.msg == FlowError.KILLED_MESSAGE


def test_another_hosts_failure_is_left_to_mitmproxy() -> None:
    flow = _failed(f"broken line Bearer {REAL}", scrubbed=False)
    stop_quoted_error(flow, _Vault(), None)
    assert flow.error is not None and REAL in flow.error.msg  # no credential goes there


def test_a_bound_hosts_reason_phrase_carries_the_placeholder_not_the_value() -> None:
    flow = _flow(scrubbed=True)
    assert flow.response is not None
    flow.response.reason = f"rejected Bearer {REAL}"
    scrub_response(flow, _Vault(), None)
    assert flow.response.reason == f"rejected Bearer {PLACEHOLDER}"


def test_a_bound_hosts_response_that_cannot_be_scrubbed_is_cut_off() -> None:
    flow = _flow(scrubbed=True)
    scrub_response(flow, _Vault(broken=True), None)
    assert flow.error is not None and flow.error.msg == FlowError.KILLED_MESSAGE
    assert flow.response is not None and flow.response.stream is False  # never streamed on
