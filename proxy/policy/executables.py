"""Executables a rule is bound to (``executables: [/usr/bin/git]``), checked when the policy loads.

A rule bound to an executable allows only connections whose owning process runs that file, as the
kernel reports it (``/proc/PID/exe``, and the file's device and inode). That proves nothing if the
sandbox could change the file, or swap it through a directory it can write: such a path is refused
at load time. The file and every directory above it must be owned by root and writable by nobody
else (no group or other write bit), so neither the sandbox user nor any non-root user can replace it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True, slots=True)
class Executable:
    path: str  # absolute, as the kernel reports it for the running binary
    identity: tuple[int, int]  # (st_dev, st_ino) when the policy loaded


def check_executable(path: str) -> Executable:
    """The executable at ``path``, or ValueError saying why a rule may not be bound to it."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    if os.path.normpath(path) != path or "//" in path:
        raise ValueError(f"{path!r} is not a normal path (write it as {os.path.normpath(path)})")
    try:
        real = os.path.realpath(path, strict=True)
        info = os.stat(real)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if real != path:
        raise ValueError(
            f"{path} is a link to {real}; the kernel reports the target: bind the rule to {real}"
        )
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o111:
        raise ValueError(f"{path} is not an executable file")
    for item in [PurePosixPath(path), *PurePosixPath(path).parents]:
        st = os.lstat(item)
        if st.st_uid != 0:
            raise ValueError(
                f"{item} is owned by uid {st.st_uid}, not root: that user could replace {path}"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
            stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and item != PurePosixPath(path)
        ):
            raise ValueError(
                f"{item} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"they could replace {path}"
            )
    return Executable(path, (info.st_dev, info.st_ino))
