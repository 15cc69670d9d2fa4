"""Real OTLP log receivers for tests: gRPC (grpcio + opentelemetry-proto's LogsService) and HTTP/protobuf.

Both listen on 127.0.0.1 and can be stopped and started again on the *same* port, so tests can take the
collector away and bring it back under a running exporter. The port is picked on first start by
``tests.harness.restartable_port``: while the receiver is down, no connect or port-0 bind of either
test process can take it (an ephemeral port's TIME_WAIT or a new listener could), and no test takes it
for a closed port. The gRPC server binds without ``SO_REUSEPORT``: a port another receiver holds
is a failure (and another port is picked), never two receivers silently sharing one port.
With ``tls=(cert, key)`` they serve TLS only. They keep the headers (gRPC metadata) of every request, so
tests can check what an exporter sent besides the records. Every wait is bounded.
"""

from __future__ import annotations

import errno
import gzip
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.harness import on_a_free_port, restartable_port


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


@dataclass
class Received:
    """One log record as the collector saw it."""

    event_name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    body: Any
    severity_text: str
    time_unix_nano: int
    scope: str
    trace_id: str = ""  # hex; empty when the record carries no trace context
    span_id: str = ""


@dataclass
class _Store:
    """Keeps the requests as received and decodes them only when a test looks, so a receiver that
    shares a process with a load generator (the tunnels benchmark) costs it almost nothing."""

    requests_seen: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)  # lower-case names
    count: int = 0
    decoded: list[Received] = field(default_factory=list)
    decoded_requests: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    rejecting: int = 0  # records to answer as rejected (OTLP partial success), from the next on

    def add(
        self, request: logs_service_pb2.ExportLogsServiceRequest, headers: dict[str, str]
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        """Keep the request; the answer says which of its records were rejected, if any."""
        n = sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
        response = logs_service_pb2.ExportLogsServiceResponse()
        with self.cond:
            self.requests_seen.append(request)
            self.headers_seen.append(headers)
            self.count += n
            rejected = min(n, self.rejecting)
            self.rejecting -= rejected
            self.cond.notify_all()
        if rejected:
            response.partial_success.rejected_log_records = rejected
            response.partial_success.error_message = "rejected by the test collector"
        return response

    @property
    def requests(self) -> int:
        return len(self.requests_seen)

    def records(self) -> list[Received]:
        """All records so far, decoded (call with ``cond`` held)."""
        for request in self.requests_seen[self.decoded_requests :]:
            self.decoded.extend(_decode(request))
        self.decoded_requests = len(self.requests_seen)
        return list(self.decoded)


def _decode(request: logs_service_pb2.ExportLogsServiceRequest) -> list[Received]:
    found: list[Received] = []
    for rl in request.resource_logs:
        resource = {kv.key: any_value(kv.value) for kv in rl.resource.attributes}
        for sl in rl.scope_logs:
            for rec in sl.log_records:
                found.append(
                    Received(
                        event_name=rec.event_name,
                        attributes={kv.key: any_value(kv.value) for kv in rec.attributes},
                        resource=resource,
                        body=any_value(rec.body),
                        severity_text=rec.severity_text,
                        time_unix_nano=rec.time_unix_nano,
                        scope=sl.scope.name,
                        trace_id=rec.trace_id.hex(),
                        span_id=rec.span_id.hex(),
                    )
                )
    return found


class _Receiver:
    protocol = ""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.port = 0
        self.tls = tls  # (certificate chain, private key) to serve TLS with
        self._store = _Store()

    def reject(self, records: int) -> None:
        """Answer the next ``records`` records as rejected (a partial success), as a collector
        refusing records it cannot take does."""
        with self._store.cond:
            self._store.rejecting = records

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def raw_requests(
        self,
    ) -> list[tuple[dict[str, str], logs_service_pb2.ExportLogsServiceRequest]]:
        """(headers, request) of every request, as received."""
        with self._store.cond:
            return list(zip(self._store.headers_seen, self._store.requests_seen, strict=True))

    @property
    def records(self) -> list[Received]:
        with self._store.cond:
            return self._store.records()

    @property
    def count(self) -> int:
        """How many records arrived (cheap: nothing is decoded)."""
        with self._store.cond:
            return self._store.count

    @property
    def requests(self) -> int:
        with self._store.cond:
            return self._store.requests

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Bounded wait until at least ``count`` records arrived; returns all records."""
        deadline = time.monotonic() + timeout
        with self._store.cond:
            while self._store.count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._store.cond.wait(remaining)
            return self._store.records()

    def start(self) -> None:
        raise NotImplementedError

    def _bound(self, bind: Callable[[int], int]) -> int:
        """``bind(port)`` on this receiver's port, or on one ``restartable_port`` picks (another
        when it is taken) when it has none yet; the port it bound."""
        if self.port:
            return bind(self.port)
        return on_a_free_port(bind, 20, pick=restartable_port)[1]

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> _Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        return self.store.add(request, {k.lower(): v for k, v in context.invocation_metadata()})


class GrpcReceiver(_Receiver):
    protocol = "grpc"

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(tls)
        self._server: grpc.Server | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        credentials = None
        if self.tls is not None:
            chain, key = (p.read_bytes() for p in self.tls)
            credentials = grpc.ssl_server_credentials([(key, chain)])
        made: list[grpc.Server] = []

        def bind(port: int) -> int:
            """A new server on ``port`` (a server whose bind failed is not reused)."""
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
            )
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
                _LogsServicer(self._store), server
            )
            address = f"127.0.0.1:{port}"
            try:
                if credentials is None:
                    bound = server.add_insecure_port(address)
                else:
                    bound = server.add_secure_port(address, credentials)
            except RuntimeError as exc:  # grpcio raises where older versions returned 0
                bound = 0
                why = f": {exc}"
            else:
                why = ""
            if bound == 0:  # gRPC does not say why; a port another server holds is the cause here
                raise OSError(errno.EADDRINUSE, f"gRPC receiver could not bind {address}{why}")
            made.append(server)
            return int(bound)

        self.port = self._bound(bind)
        server = made[-1]
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None


class _HttpHandler(BaseHTTPRequestHandler):
    store: _Store

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            data = gzip.decompress(data)
        elif encoding == "deflate":
            data = zlib.decompress(data)
        if self.path != "/v1/logs":
            self.send_error(404)
            return
        request = logs_service_pb2.ExportLogsServiceRequest()
        request.ParseFromString(data)
        body = self.store.add(
            request, {k.lower(): v for k, v in self.headers.items()}
        ).SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpReceiver(_Receiver):
    protocol = "http"

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(tls)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        handler = type("Handler", (_HttpHandler,), {"store": self._store})
        made: list[ThreadingHTTPServer] = []

        def bind(port: int) -> int:
            made.append(ThreadingHTTPServer(("127.0.0.1", port), handler))
            return port

        self._bound(bind)
        server = made[-1]
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


def main() -> None:
    """``python -m tests.otlp_receiver [grpc|http]``: serve in this process (e.g. for a benchmark), print
    the endpoint, and stop when stdin closes; then print how many records arrived."""
    import sys

    rx: _Receiver = GrpcReceiver() if sys.argv[1:] == ["grpc"] else HttpReceiver()
    rx.start()
    print(f"{rx.endpoint}", flush=True)
    try:
        sys.stdin.read()
    finally:
        rx.stop()
        print(rx.count, flush=True)


if __name__ == "__main__":
    main()
