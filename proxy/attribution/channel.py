"""The host-side admin channel of a sandbox's gate: ``egress context SANDBOX key=value`` changes the
agent context its later decisions carry.

A Unix socket ``<state dir>/run/<sandbox id>.sock``, mode 0600 in a 0700 directory. The state
directory is covered by an empty mount inside the sandbox, so the sandbox cannot even name the
socket; and because the sandbox's processes run as the launching user, the gate does not stop at
the peer's uid (``SO_PEERCRED``: the gate's own, or root): the peer process must also be in the gate's
own network namespace, which no sandboxed process is (read through the connecting process's pidfd,
as the listener hand-off does: :mod:`proxy.attribution.peer`). Nothing the sandbox sends through the proxy
can change its context.

Wire format: one JSON line ``{"version": 1, "set": {"key": "value"}, "unset": ["key"]}``; the answer is
one JSON line ``{"ok": true, "context": {...}}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from proxy.attribution.context import merged
from proxy.attribution.peer import peer_netns, peer_uid
from proxy.attribution.stamp import SandboxFacts

log = logging.getLogger(__name__)

MAX_MESSAGE = 16384
TIMEOUT = 5.0


class ChannelError(Exception):
    pass


def socket_path(state_dir: Path, sandbox_id: str) -> Path:
    return state_dir / "run" / f"{sandbox_id}.sock"


async def open_channel(
    state_dir: Path, sandbox_id: str, facts: SandboxFacts
) -> ContextChannel | None:
    """The sandbox's context channel, listening; None when another running gate already serves
    that sandbox id (it warned)."""
    channel = ContextChannel(socket_path(state_dir, sandbox_id), facts)
    return channel if await channel.start() else None


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ContextChannel:
    def __init__(self, path: Path, facts: SandboxFacts) -> None:
        self.path = path
        self.facts = facts
        self.uids = {os.getuid(), 0}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        """Listen; False (and a warning) when a running gate already serves this sandbox id."""
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if _alive(self.path):
            log.warning(
                "another gate serves sandbox id %s's context channel (%s); `egress context` "
                "reaches that one, not this run",
                self.path.stem,
                self.path,
            )
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left behind by a gate that died
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        return True

    async def close(self) -> None:
        if self._server is None:
            return  # never listened: the socket there is another gate's
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def refusal(self, sock: socket.socket) -> str | None:
        """Why this peer may not change the context, or None."""
        uid = peer_uid(sock)
        if uid not in self.uids:
            return f"uid {uid} may not change this sandbox's context"
        try:
            if peer_netns(sock) != os.stat("/proc/self/ns/net").st_ino:
                return "only processes outside the sandbox may change its context"
        except OSError:
            return "the caller's network namespace could not be checked"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # The request is read (bounded) before the answer, so even a refused caller gets one.
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            refusal = self.refusal(writer.get_extra_info("socket"))
            answer: dict[str, Any] = (
                {"ok": False, "error": refusal} if refusal is not None else self._apply(line)
            )
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            log.debug("context channel connection failed", exc_info=True)
        finally:
            writer.close()

    def _apply(self, line: bytes) -> dict[str, Any]:
        try:
            if len(line) > MAX_MESSAGE:
                raise ValueError("message too long")
            message = json.loads(line)
            if not isinstance(message, dict) or message.get("version") != 1:
                raise ValueError("expected a version 1 message")
            updates = message.get("set") or {}
            unset = message.get("unset") or []
            if not isinstance(updates, dict) or not isinstance(unset, list):
                raise ValueError("'set' is an object and 'unset' a list")
            pairs = [(str(k), str(v)) for k, v in updates.items()]
            context = merged(self.facts.context, pairs, [str(k) for k in unset])
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        self.facts.set_context(context)
        return {"ok": True, "context": context}


def send(path: Path, updates: dict[str, str], unset: list[str]) -> dict[str, str]:
    """Change a running sandbox's context; its new context, or ChannelError saying why not."""
    message = json.dumps({"version": 1, "set": updates, "unset": unset}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(message)  # a gate that refused early has answered already
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_MESSAGE:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ChannelError(
            f"cannot reach the sandbox's gate at {path}: {exc.strerror or exc}"
        ) from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ChannelError("the gate gave no answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ChannelError(str(error or "refused"))
    context = answer.get("context")
    return dict(context) if isinstance(context, dict) else {}
