"""Where OTLP export goes: the collector's URL and protocol, from the flags or the standard variables.

Imports nothing but the standard library, so the evidence config can validate ``--otlp-*`` flags
without loading OpenTelemetry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

Protocol = Literal["grpc", "http"]


def resolve_endpoint(
    endpoint: str | None, protocol: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, Protocol] | None:
    """(endpoint URL, protocol) from CLI values, falling back to the standard ``OTEL_EXPORTER_OTLP_*``
    variables; None when no endpoint is configured (export off).

    Protocol without a flag or variable: ``grpc`` for port 4317 (the collector's gRPC port), otherwise
    ``http`` (the OTLP specification's default, http/protobuf). For HTTP the generic endpoint is a base URL
    and ``/v1/logs`` is appended, as the specification requires; the ``_LOGS_`` variable is used as is.
    """
    env = os.environ if env is None else env
    signal_specific = False
    if endpoint is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or None
        signal_specific = endpoint is not None
    if endpoint is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    if not endpoint:
        return None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.warning("OTEL_SDK_DISABLED=true: OTLP export to %s is off", endpoint)
        return None
    raw = (
        protocol
        or env.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    )
    if raw is None:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        raw = "grpc" if parts.port == 4317 else "http"
    chosen: Protocol
    if raw == "grpc":
        chosen = "grpc"
    elif raw in ("http", "http/protobuf"):
        chosen = "http"
    else:
        raise ValueError(f"--otlp-protocol must be grpc or http (http/protobuf), not {raw!r}")
    if chosen == "http" and not signal_specific:
        parts = urlsplit(endpoint)
        if not parts.path.rstrip("/").endswith("/v1/logs"):
            endpoint = urlunsplit(
                (parts.scheme, parts.netloc, parts.path.rstrip("/") + "/v1/logs", parts.query, "")
            )
    return endpoint, chosen
