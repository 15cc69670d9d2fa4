"""The credential swap on mitmproxy flows: what a request carries, the real value in, echoes out.

The checkpoint decides (step 3b, :mod:`proxy.core.credentials`); this module only translates: it
reads what a request carries into a :class:`Carried`, replaces an admitted placeholder by the real
value in the request about to be sent, and scrubs responses on bound hosts.

Responses: every response the gate reads (an inspected tunnel, plain HTTP) from a host a credential of
this sandbox is bound to, on any of its ports, is scrubbed - reason phrase, headers, body and
trailers - whether or not its request carried the credential (a service may store a header and show
it later, on another of its ports too; a gRPC service quotes a rejected token
in the ``grpc-message`` trailer that ends an HTTP/2 stream). Its request asks for
``Accept-Encoding: identity`` so that the body can be read as it streams; the body is always
streamed through a :class:`Scrubber` (which holds back at most the longest value's length minus one
byte between chunks, never the whole body). A response that comes back compressed anyway cannot be
read on the fly: it is cut off (the client sees the connection fail), never passed unread; nor is a
failure whose error text quotes a value (:func:`stop_quoted_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http

from proxy.core.credentials import Carried, Scrubber, Vault, scrub_text, swap_header, swap_query

log = logging.getLogger(__name__)

SCRUB = "egress.scrub"  # flow.metadata: this flow's response is scrubbed (a bound host)


def carried(req: http.Request, body: bytes | None = None) -> Carried:
    """Every header field, the target and (when held) the body of a request, as plain values."""
    headers = tuple(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in req.headers.fields
    )
    return Carried(headers, req.path, body)


def swap(flow: http.HTTPFlow, vault: Vault, sandbox_id: str | None, names: str) -> None:
    """Replace the placeholders of the admitted credentials ``names`` by their real values, where
    the checkpoint found them (and, having judged the request, only there)."""
    credentials = vault.credentials()
    req = flow.request
    fields = []
    for raw_name, raw_value in req.headers.fields:
        value = raw_value.decode("latin-1")
        for name in names.split(","):
            placeholder = credentials.placeholder(name, sandbox_id)
            if placeholder is None:
                continue
            real = vault.value(name)
            if placeholder in value:
                value = swap_header(value, "header:", placeholder, real)
            elif credentials.bindings[name].delivery.basic:
                value = swap_header(value, "basic:", placeholder, real)
        fields.append((raw_name, value.encode("latin-1")))
    req.headers.fields = tuple(fields)
    for name in names.split(","):
        query = credentials.bindings[name].delivery.query
        placeholder = credentials.placeholder(name, sandbox_id)
        if query is not None and placeholder is not None and "?" in req.path:
            req.path = swap_query(req.path, query, placeholder, vault.value(name))


def prepare_scrub(flow: http.HTTPFlow) -> None:
    """The request goes to a bound host: its response will be scrubbed, so ask for it unencoded,
    and whole. The scrubber finds whole values only; a byte range the agent chose could cut an
    echoed value into parts that each pass (``Range`` and ``If-Range`` are dropped: the service
    sends the whole body, which a client that asked for a range reads as a fresh download)."""
    flow.metadata[SCRUB] = True  # first: whatever follows, the answer is scrubbed
    headers = flow.request.headers
    headers["accept-encoding"] = "identity"
    for name in ("range", "if-range"):
        if name in headers:
            del headers[name]


def scrub_response(flow: http.HTTPFlow, vault: Vault, sandbox_id: str | None) -> None:
    """Scrub a bound host's response: its status line's reason and its headers now, its body as
    it streams. A response that cannot be scrubbed is cut off, never passed on as it came."""
    response = flow.response
    if response is None or not flow.metadata.get(SCRUB):
        return
    try:
        _scrub_response(flow, response, vault.scrub_pairs(sandbox_id))
    except Exception:
        log.exception("a response from %s could not be scrubbed; it was cut off", flow.request.host)
        if flow.killable:
            flow.kill()


def _scrub_response(
    flow: http.HTTPFlow, response: http.Response, pairs: list[tuple[str, str]]
) -> None:
    response.reason = scrub_text(response.reason, pairs)  # HTTP/1's status line says anything
    response.headers.fields = _scrubbed(response.headers.fields, pairs)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    # A transfer coding compresses as a content coding does (``gzip, chunked``): a client that
    # undoes it, or an agent that gunzips what it got, would read what the scrubber could not.
    transfer = {c.strip().lower() for c in response.headers.get("transfer-encoding", "").split(",")}
    if encoding not in ("", "identity") or transfer - {"", "chunked", "identity"}:
        log.warning(
            "a response from %s came back encoded (content %s, transfer %s) although identity "
            "was asked for; it cannot be scrubbed as it streams, so it was cut off",
            flow.request.host,
            encoding or "-",
            response.headers.get("transfer-encoding", "-"),
        )
        flow.kill()
        return
    response.stream = _chunks(
        Scrubber((r.encode("latin-1"), p.encode("latin-1")) for r, p in pairs)
    )


def _chunks(scrubber: Scrubber) -> Callable[[bytes], list[bytes]]:
    """The scrubber as mitmproxy's stream callback, which must never hand on an empty chunk:
    over HTTP/1.1 with chunked framing mitmproxy writes it as a zero-length chunk, the end of the
    body, and the client saw a body cut at the first chunk the scrubber held back whole."""

    def stream(data: bytes) -> list[bytes]:
        out = scrubber(data)
        return [out] if out else []

    return stream


def scrub_trailers(flow: http.HTTPFlow, vault: Vault, sandbox_id: str | None) -> None:
    """A bound host's response trailers, scrubbed as its headers were. mitmproxy keeps them until
    the ``response`` hook (after the body) and sends them after it: the hook calls this. Trailers
    that cannot be scrubbed are dropped, never sent as they came."""
    response = flow.response
    if response is None or not flow.metadata.get(SCRUB) or not response.trailers:
        return
    try:
        response.trailers.fields = _scrubbed(
            response.trailers.fields, vault.scrub_pairs(sandbox_id)
        )
    except Exception:
        log.exception("the trailers of a response from %s were dropped", flow.request.host)
        response.trailers = None


def stop_quoted_error(flow: http.HTTPFlow, vault: Vault, sandbox_id: str | None) -> None:
    """A bound host's failure whose text quotes a real value (an answer no reader takes, its
    broken line echoing the credential): mitmproxy would show that text to the client in its
    error answer, so the flow is killed instead and the client sees the stream end. Called from
    the ``error`` hook, which mitmproxy runs before it sends that answer."""
    error = flow.error
    if error is None or not flow.metadata.get(SCRUB) or not flow.killable:
        return
    try:
        quoted = scrub_text(error.msg, vault.scrub_pairs(sandbox_id)) != error.msg
    except Exception:  # cannot tell: the text is not shown
        log.exception("the error of a response from %s could not be checked", flow.request.host)
        quoted = True
    if quoted:
        log.warning(
            "a response from %s failed with text that quotes a credential's value; the client's "
            "stream was ended instead of showing it",
            flow.request.host,
        )
        flow.kill()


def _scrubbed(
    fields: tuple[tuple[bytes, bytes], ...], pairs: list[tuple[str, str]]
) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(
        (
            scrub_text(name.decode("latin-1"), pairs, fold_case=True).encode("latin-1"),
            scrub_text(value.decode("latin-1"), pairs).encode("latin-1"),
        )
        for name, value in fields
    )


__all__ = [
    "SCRUB",
    "carried",
    "prepare_scrub",
    "scrub_response",
    "scrub_trailers",
    "stop_quoted_error",
    "swap",
]
