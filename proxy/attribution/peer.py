"""Who is at the other end of a local (Unix) socket: its uid and its network namespace.

Both host-side channels into a gate (the listener hand-off, :mod:`proxy.sandbox.handoff`, and a
sandbox's context channel, :mod:`proxy.attribution.channel`) admit only callers outside every
sandbox, which run as the same uid: the caller's network namespace is what tells them apart. It is
read through a pidfd (``SO_PEERPIDFD``, Linux 6.5), so the answer is about the very process that
connected: one that connected, passed the connection on to a sandboxed process and exited cannot
have its pid taken by another process (one in the gate's namespace) in between.
"""

from __future__ import annotations

import os
import socket
import struct

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_CREDS = struct.Struct("3i")


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(uid)


def peer_netns(conn: socket.socket) -> int:
    """The network namespace (its inode) of the process that connected ``conn``. OSError when it
    cannot be told: the process is not visible here, or it has gone. Older kernels (no
    ``SO_PEERPIDFD``): ``SO_PEERCRED``'s pid."""
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        pidfd = -1
    if pidfd < 0:
        pid, _uid, _gid = _CREDS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        )
        if pid <= 0:
            raise ProcessLookupError("the peer's process is not visible from the gate")
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    try:
        pid = _pidfd_pid(pidfd)
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        if _pidfd_pid(pidfd) != pid:  # it exited while we looked: the pid may be another's now
            raise ProcessLookupError("the peer's process has exited")
        return inode
    finally:
        os.close(pidfd)


def _pidfd_pid(pidfd: int) -> int:
    """The pid (in our PID namespace) of the process a pidfd refers to, while it runs."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
                break
    raise ProcessLookupError("the peer's process has exited or is not visible from the gate")


__all__ = ["peer_netns", "peer_uid"]
