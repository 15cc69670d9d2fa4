"""Relay from a listener inside a sandbox to a gate that runs elsewhere (``egress run --proxy URL``).

With a private gate there is no relay: the gate accepts on the in-sandbox listener itself. A shared
gate is another process, possibly on another machine, so each connection accepted inside the sandbox
is joined to a fresh TCP connection from the launcher (which stays in the host's network namespace)
to the gate. The sandbox can reach exactly that one address and port, and only through the gate's
own checks.

Bytes move with ``splice(2)`` through a pipe, one blocking thread per direction: the payload stays in
the kernel (no copy into Python), and the per-connection cost is two threads, bounded by
``max_connections`` (threat 13: a sandbox opening thousands of idle connections cannot exhaust the
launcher; excess connections are closed at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1)  # not SPLICE_F_MORE: it corks the socket


@dataclass
class RelayStats:
    accepted: int = 0
    refused: int = 0  # over the connection limit
    failed: int = 0  # the gate could not be reached
    bytes_up: int = 0
    bytes_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, up: int = 0, down: int = 0) -> None:
        with self.lock:
            self.bytes_up += up
            self.bytes_down += down


class Relay:
    """Accepts on ``listener`` (inside the sandbox) and relays each connection to ``target``."""

    def __init__(
        self,
        listener: socket.socket,
        target: tuple[str, int],
        *,
        max_connections: int = 256,
        connect_timeout: float = 10.0,
    ) -> None:
        self.listener = listener
        self.target = target
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.stats = RelayStats()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="egress-relay", daemon=True)

    def start(self) -> Relay:
        self.listener.setblocking(True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and cut every relayed connection (the sandbox is gone or going)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self.stats.refused += 1
                inside.close()
                continue
            self.stats.accepted += 1
            threading.Thread(
                target=self._serve, args=(inside,), name="egress-relay-conn", daemon=True
            ).start()

    def _serve(self, inside: socket.socket) -> None:
        outside: socket.socket | None = None
        try:
            try:
                outside = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError as exc:
                self.stats.failed += 1
                log.warning("cannot reach the gate at %s:%d: %s", *self.target, exc)
                return
            outside.settimeout(None)
            outside.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._open_lock:
                self._open.update((inside, outside))
            down = threading.Thread(
                target=self._pump, args=(outside, inside, False), name="egress-relay-down"
            )
            down.start()
            self._pump(inside, outside, True)
            down.join()
        finally:
            with self._open_lock:
                self._open.discard(inside)
                if outside is not None:
                    self._open.discard(outside)
            inside.close()
            if outside is not None:
                outside.close()
            self._slots.release()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        """Move bytes src -> dst until EOF, then half-close dst so the peer sees the EOF."""
        r, w = os.pipe()
        total = 0
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
            while True:
                n = os.splice(src.fileno(), w, _CHUNK, flags=_SPLICE_FLAGS)
                if n == 0:
                    break
                total += n
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=_SPLICE_FLAGS)
        except OSError:
            pass  # reset by either side: both directions end below
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            if up:
                self.stats.add(up=total)
            else:
                self.stats.add(down=total)


class UdpRelay:
    """Relays DNS datagrams from the sandbox's 127.0.0.1:53 to a DNS gate elsewhere.

    One connected outside socket per inside client (bounded, oldest dropped first), so replies find
    their way back; a single thread serves them all with a selector.
    """

    def __init__(
        self, inside: socket.socket, target: tuple[str, int], *, max_clients: int = 64
    ) -> None:
        self.inside = inside
        self.target = target
        self.max_clients = max_clients
        self._clients: dict[tuple[str, int], socket.socket] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="egress-udp-relay", daemon=True)

    def start(self) -> UdpRelay:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.inside.close()
        for sock in self._clients.values():
            sock.close()
        self._clients.clear()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        self.inside.setblocking(False)
        sel.register(self.inside, selectors.EVENT_READ, None)
        try:
            while not self._closed.is_set():
                for key, _ in sel.select(timeout=0.2):
                    if key.data is None:
                        self._from_inside(sel)
                    else:
                        self._from_outside(key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            sel.close()

    def _from_inside(self, sel: selectors.BaseSelector) -> None:
        try:
            data, client = self.inside.recvfrom(65535)
        except OSError:
            return
        out = self._clients.get(client)
        if out is None:
            if len(self._clients) >= self.max_clients:
                oldest = next(iter(self._clients))
                old = self._clients.pop(oldest)
                sel.unregister(old)
                old.close()
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.setblocking(False)
            out.connect(self.target)
            self._clients[client] = out
            sel.register(out, selectors.EVENT_READ, client)
        with contextlib.suppress(OSError):
            out.send(data)

    def _from_outside(self, out: socket.socket, client: tuple[str, int]) -> None:
        try:
            data = out.recv(65535)
        except OSError:
            return
        with contextlib.suppress(OSError):
            self.inside.sendto(data, client)
