"""Sending one prebuilt, serialised OTLP request to the collector, over gRPC or HTTP/protobuf.

Built on public APIs only: ``LogsService.Export`` called on a ``grpc`` channel with the method path
from ``opentelemetry-proto``'s descriptor (the generated stub would serialise a message again), and an
HTTP POST (``requests``) of the serialised message with the headers OTLP/HTTP requires.
The SDK's exporters are not used because they take SDK log records, not a request, and reusing them
meant overriding their private methods, which change between minor releases. What they read from the
environment is read here by :mod:`proxy.evidence.otel.settings`.

A transport makes one attempt per call and says why it failed; retrying, backing off and never losing
a batch is the retry queue's job (:mod:`proxy.evidence.otel.retry_queue`).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from typing import Any, Protocol
from urllib.parse import urlsplit

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    DESCRIPTOR as LOGS_SERVICE,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceResponse,
)

from proxy.evidence.otel.endpoint import Protocol as OtlpProtocol
from proxy.evidence.otel.settings import ExporterSettings

log = logging.getLogger(__name__)

# "/opentelemetry.proto.collector.logs.v1.LogsService/Export", from the proto's own descriptor
EXPORT_METHOD = "/{}/Export".format(LOGS_SERVICE.services_by_name["LogsService"].full_name)


class ExportFailed(Exception):
    """The collector did not take the batch (unreachable, refused, timed out); worth retrying."""


class Transport(Protocol):
    def send(self, payload: bytes) -> int:
        """Deliver the serialised request or raise :class:`ExportFailed`; returns how many of its
        records the collector said it rejected (OTLP partial success: not to be sent again)."""

    def shutdown(self) -> None: ...


def make_transport(
    endpoint: str, protocol: OtlpProtocol, settings: ExporterSettings, version: str
) -> Transport:
    user_agent = f"agent-egress/{version}"
    if protocol == "grpc":
        return GrpcTransport(endpoint, settings, user_agent)
    return HttpTransport(endpoint, settings, user_agent)


def _rejected(response: ExportLogsServiceResponse) -> int:
    """The records a collector that took the request says it rejected (a partial success): they
    are not delivered, so the retry queue counts them dropped, not exported."""
    partial = response.partial_success
    if partial.rejected_log_records or partial.error_message:
        log.warning(
            "OTLP collector rejected %d of the records sent: %r",
            partial.rejected_log_records,
            partial.error_message[:200],
        )
    return max(0, partial.rejected_log_records)


class HttpTransport:
    """OTLP/HTTP with binary protobuf: one POST per batch on a kept-alive session."""

    def __init__(self, endpoint: str, settings: ExporterSettings, user_agent: str) -> None:
        import requests

        self.endpoint = endpoint
        self.timeout = settings.timeout
        self.compression = settings.compression
        self._requests = requests
        self._session = requests.Session()
        # per request, so REQUESTS_CA_BUNDLE in the environment cannot replace the configured CA
        self._verify: str | bool = settings.certificate or True
        self._cert: str | tuple[str, str] | None = settings.client_certificate
        if settings.client_certificate and settings.client_key:
            self._cert = (settings.client_certificate, settings.client_key)
        self._headers = {"content-type": "application/x-protobuf", "user-agent": user_agent}
        self._headers.update(settings.headers)
        if self.compression != "none":
            self._headers["content-encoding"] = self.compression

    def send(self, payload: bytes) -> int:
        data = payload
        if self.compression == "gzip":
            data = gzip.compress(data, compresslevel=6)
        elif self.compression == "deflate":
            data = zlib.compress(data)
        try:
            response = self._session.post(
                self.endpoint,
                data=data,
                headers=self._headers,
                timeout=self.timeout,
                verify=self._verify,
                cert=self._cert,
            )
        except self._requests.RequestException as exc:
            raise ExportFailed(f"{self.endpoint}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise ExportFailed(
                f"{self.endpoint}: HTTP {response.status_code} {response.text[:200]!r}"
            )
        try:
            return _rejected(ExportLogsServiceResponse.FromString(response.content))
        except Exception:  # the batch was accepted; an odd reply body changes nothing
            log.debug("OTLP collector reply not understood", exc_info=True)
            return 0

    def shutdown(self) -> None:
        self._session.close()


class GrpcTransport:
    """OTLP/gRPC: ``LogsService.Export`` on one channel, rebuilt when the collector was unreachable
    so a collector that comes back is reached at the retry queue's pace, not gRPC's own backoff."""

    def __init__(self, endpoint: str, settings: ExporterSettings, user_agent: str) -> None:
        import grpc

        self._grpc = grpc
        parts = urlsplit(endpoint)
        self.target = parts.netloc if parts.scheme in ("http", "https") else endpoint
        if parts.scheme == "https":
            secure = True
        elif parts.scheme == "http":
            secure = False
        else:
            secure = not settings.insecure
        self.timeout = settings.timeout
        self._metadata = settings.headers
        self._options = [("grpc.primary_user_agent", user_agent)]
        self._compression = {
            "none": grpc.Compression.NoCompression,
            "gzip": grpc.Compression.Gzip,
            "deflate": grpc.Compression.Deflate,
        }[settings.compression]
        self._credentials = _credentials(grpc, settings) if secure else None
        self._channel: Any = None
        self._export: Any = None
        self._connect()

    def _connect(self) -> None:
        grpc = self._grpc
        if self._credentials is None:
            self._channel = grpc.insecure_channel(
                self.target, options=self._options, compression=self._compression
            )
        else:
            self._channel = grpc.secure_channel(
                self.target, self._credentials, options=self._options, compression=self._compression
            )
        # LogsService.Export taking the request already serialised (no request serializer): the
        # method's path and response type are the generated stub's
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportLogsServiceResponse.FromString,
        )

    def send(self, payload: bytes) -> int:
        grpc = self._grpc
        try:
            response = self._export(payload, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                self._channel.close()
                self._connect()
            name = code.name if code is not None else "error"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ExportFailed(f"{self.target}: {name} {details}") from exc
        return _rejected(response)

    def shutdown(self) -> None:
        self._channel.close()


def _credentials(grpc: Any, settings: ExporterSettings) -> Any:
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.certificate),
        private_key=read(settings.client_key),
        certificate_chain=read(settings.client_certificate),
    )
