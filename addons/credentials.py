"""The credential swap on mitmproxy flows: what a request carries, the real value in, echoes out.

The checkpoint decides (step 3b, :mod:`proxy.core.credentials`); this module only translates: it
reads what a request carries into a :class:`Carried`, replaces an admitted placeholder by the real
value in the request about to be sent, and scrubs responses on bound hosts.

Responses: every response inside an inspected tunnel to a host a credential of this sandbox is bound
to is scrubbed, headers and body, whether or not its request carried the credential (a service may
store a header and show it later). Its request asks for ``Accept-Encoding: identity`` so that the
body can be read as it streams; the body is always streamed through a :class:`Scrubber` (which holds
back at most the longest value's length minus one byte between chunks, never the whole body). A
response that comes back compressed anyway cannot be read on the fly: it is cut off (the client sees
the connection fail), never passed unread.
"""

from __future__ import annotations

import logging

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
    """The request goes to a bound host: its response will be scrubbed, so ask for it unencoded."""
    flow.request.headers["accept-encoding"] = "identity"
    flow.metadata[SCRUB] = True


def scrub_response(flow: http.HTTPFlow, vault: Vault, sandbox_id: str | None) -> None:
    """Scrub a bound host's response: its headers now, its body as it streams."""
    response = flow.response
    if response is None or not flow.metadata.get(SCRUB):
        return
    pairs = vault.scrub_pairs(sandbox_id)
    fields = []
    for name, value in response.headers.fields:
        text = value.decode("latin-1")
        fields.append((name, scrub_text(text, pairs).encode("latin-1")))
    response.headers.fields = tuple(fields)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        log.warning(
            "a response from %s came back %s-encoded although identity was asked for; it cannot "
            "be scrubbed as it streams, so it was cut off",
            flow.request.host,
            encoding,
        )
        flow.kill()
        return
    response.stream = Scrubber((r.encode("latin-1"), p.encode("latin-1")) for r, p in pairs)


__all__ = ["SCRUB", "carried", "prepare_scrub", "scrub_response", "swap"]
