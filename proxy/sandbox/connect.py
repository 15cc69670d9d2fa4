"""``egress connect HOST PORT``: a stdio-to-CONNECT helper, for ssh's ProxyCommand and git://.

Inside the sandbox the only route out is the gate's proxy, so ``git clone git@github.com:...`` must
tunnel through an HTTP CONNECT. The gate decides that CONNECT like any other (allowed only where a rule
lists port 22); a refusal is printed to stderr with the gate's reason and the exit status is 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Mapping
from urllib.parse import unquote

from proxy.core.authority import join_authority
from proxy.sandbox.env import ProxyAddress

MAX_HEADER = 65536
_PROXY_VARS = ("EGRESS_PROXY", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY")


class TunnelRefused(Exception):
    """The gate answered the CONNECT with something other than 200 (its refusal)."""


def proxy_from_env(env: Mapping[str, str]) -> ProxyAddress | None:
    for name in _PROXY_VARS:
        value = env.get(name)
        if value:
            return ProxyAddress.parse(value)
    return None


def connect_request(host: str, port: int, proxy: ProxyAddress) -> bytes:
    if any(c in host for c in "\r\n\0 /@") or not host:
        raise ValueError(f"invalid host {host!r}")
    authority = join_authority(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username is not None:
        token = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(token.encode()).decode()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def open_tunnel(host: str, port: int, proxy: ProxyAddress, timeout: float = 30.0) -> socket.socket:
    """A socket that is a CONNECT tunnel to host:port; raises TunnelRefused with the gate's
    status line and message when the gate says no."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    try:
        sock.sendall(connect_request(host, port, proxy))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the gate closed the connection before answering")
            buf += chunk
            if len(buf) > MAX_HEADER:
                raise ConnectionError("the gate's answer is too long")
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            body = rest
            with contextlib.suppress(OSError):
                sock.settimeout(2)
                while len(body) < 4096:
                    more = sock.recv(4096)
                    if not more:
                        break
                    body += more
            message = body.decode("utf-8", "replace").strip()
            raise TunnelRefused(f"{status_line}: {message}" if message else status_line)
        sock.settimeout(None)
        if rest:  # bytes the server sent right after the tunnel opened (an SSH banner)
            os.write(sys.stdout.fileno(), rest)
        return sock
    except BaseException:
        sock.close()
        raise


def relay_stdio(sock: socket.socket) -> None:
    """stdin -> tunnel in a thread, tunnel -> stdout here; ends when the tunnel closes."""

    def upstream() -> None:
        try:
            while True:
                data = os.read(sys.stdin.fileno(), 65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.fileno()
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--proxy",
        metavar="URL",
        default=None,
        help="the gate (default: $EGRESS_PROXY, then $HTTPS_PROXY/$ALL_PROXY/$HTTP_PROXY)",
    )


def connect_main(args: argparse.Namespace) -> int:
    try:
        proxy = ProxyAddress.parse(args.proxy) if args.proxy else proxy_from_env(os.environ)
    except ValueError as exc:
        print(f"egress connect: {exc}", file=sys.stderr)
        return 2
    if proxy is None:
        print("egress connect: no proxy: set --proxy or HTTPS_PROXY", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"egress connect: invalid port {args.port}", file=sys.stderr)
        return 2
    try:
        sock = open_tunnel(args.host, args.port, proxy)
    except TunnelRefused as exc:
        print(f"egress connect: the gate refused {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(
            f"egress connect: cannot open a tunnel to {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    with sock:
        relay_stdio(sock)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egress connect", description=__doc__)
    add_arguments(parser)
    return connect_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
