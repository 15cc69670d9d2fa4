"""``/metrics`` and ``/healthz`` on the metrics listener.

``/healthz`` answers 200 with ``{"status": "ok"}`` while the policy files on disk are what the gate
enforces, and 200 with ``{"status": "stale", ...}`` (the version in force, the refused reload's problems)
after a reload was refused: the gate still enforces its last good policy, so it is alive and ready, but
someone must fix the file. ``/healthz?strict`` answers 503 when stale, for probes and alerts that only
read status codes. Both names are served by one small WSGI app next to prometheus-client's own.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

Health = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the decision log."""


def health_app(
    metrics_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
    health: Callable[[], Health | None],
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        check = health()
        ok, details = check() if check is not None else (True, {})
        body = {"status": "ok" if ok else "stale", **details}
        strict = "strict" in str(environ.get("QUERY_STRING", "")).split("&")
        status = "503 Service Unavailable" if strict and not ok else "200 OK"
        data = json.dumps(body, sort_keys=True).encode()
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    return app


def serve_metrics(
    host: str, port: int, registry: CollectorRegistry, health: Callable[[], Health | None]
) -> tuple[WSGIServer, threading.Thread]:
    class Server(ThreadingWSGIServer):  # type: ignore[misc]
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    app = health_app(make_wsgi_app(registry), health)
    server = make_server(host, port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
