"""How to talk to the collector: headers, compression, TLS files and timeout from the standard
``OTEL_EXPORTER_OTLP_LOGS_*`` / ``OTEL_EXPORTER_OTLP_*`` variables (the signal's own variable first).

Read once and checked when the gate starts, so a typo in a variable is an error that names it, not a
collector that silently never receives anything. The export process inherits the environment and
reads the same values. ``..._TIMEOUT`` is in seconds, as the Python SDK reads it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Compression = Literal["none", "gzip", "deflate"]
DEFAULT_TIMEOUT = 5.0


def _variable(env: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """(variable that set it, value): the logs signal's variable wins over the general one."""
    specific = f"OTEL_EXPORTER_OTLP_LOGS_{name}"
    if env.get(specific):
        return specific, env[specific]
    general = f"OTEL_EXPORTER_OTLP_{name}"
    return general, env.get(general) or None


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    headers: tuple[tuple[str, str], ...] = ()
    compression: Compression = "none"
    certificate: str | None = None  # CA bundle that verifies the collector
    client_certificate: str | None = None  # mTLS
    client_key: str | None = None
    insecure: bool | None = None  # gRPC without a URL scheme: plaintext if true
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, timeout: float | None = None
    ) -> ExporterSettings:
        """ValueError naming the variable for a value that cannot be used."""
        env = os.environ if env is None else env
        from opentelemetry.util.re import parse_env_headers

        _, raw_headers = _variable(env, "HEADERS")
        headers = tuple(parse_env_headers(raw_headers or "", liberal=True).items())
        name, raw = _variable(env, "COMPRESSION")
        compression = (raw or "none").strip().lower()
        if compression not in ("none", "gzip", "deflate"):
            raise ValueError(f"{name} must be gzip, deflate or none, not {raw!r}")
        files: dict[str, str | None] = {}
        for key in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
            name, path = _variable(env, key)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
            files[key] = path
        name, raw = _variable(env, "INSECURE")
        insecure = None if raw is None else raw.strip().lower() == "true"
        if timeout is None:
            name, raw = _variable(env, "TIMEOUT")
            try:
                timeout = DEFAULT_TIMEOUT if raw is None else float(raw)
            except ValueError:
                timeout = -1.0
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"{name} must be a positive number of seconds, not {raw!r}")
        return cls(
            headers=headers,
            compression=compression,  # type: ignore[arg-type]
            certificate=files["CERTIFICATE"],
            client_certificate=files["CLIENT_CERTIFICATE"],
            client_key=files["CLIENT_KEY"],
            insecure=insecure,
            timeout=timeout,
        )


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """The export queue's bounds (:class:`proxy.evidence.otel.retry_queue.ReliableExporter`)."""

    max_queue: int = 8192  # records waiting, beyond the batch being sent
    batch_size: int = 512  # records per request
    flush_interval: float = 0.2  # seconds a partial batch waits for more
    max_backoff: float = 5.0  # seconds between retries of a failed batch, at most
    # Bytes of one request, at most: a batch whose encoding is larger is sent in parts. Collectors
    # refuse larger messages (4 MiB is gRPC's and the OpenTelemetry Collector's default receive
    # limit) and the same batch would be refused on every retry, holding back all that follows it.
    max_request_bytes: int = 4_000_000


DEFAULT_LIMITS = QueueLimits()
