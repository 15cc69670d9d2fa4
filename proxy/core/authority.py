"""HOST:PORT as a URL, a CONNECT line or a message writes it: an IPv6 address in brackets, the
inverse of :func:`proxy.core.hosts.split_authority`. One formatter for the gate, its messages and
the launcher; no imports, so the launcher's path pays nothing for it."""

from __future__ import annotations


def join_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
