"""Scratch files and directories with ``tempfile``'s guarantees, without importing it.

``tempfile`` brings ``shutil`` (with its compression modules) and ``random``: several milliseconds
of every ``egress run`` that starts its own gate, which proves its state directory writable and may
write a CA bundle for the sandbox (docs/startup.md). The guarantees kept: a name nobody can predict
(48 random bits from the kernel), created by this call or not at all (``O_EXCL``, ``mkdir``), never
through a symbolic link, readable by this user only unless the caller widens it.
"""

from __future__ import annotations

import contextlib
import os

ATTEMPTS = 100  # names tried before giving up (each collision is a 1 in 2**48 event)


def _name(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}{os.urandom(6).hex()}")


def create_exclusive(directory: str | os.PathLike[str], prefix: str) -> tuple[int, str]:
    """A new file in ``directory`` (mode 0600, opened for writing): its descriptor and its path, as
    ``tempfile.mkstemp`` returns them. OSError when the directory cannot take one."""
    base = os.fspath(directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _attempt in range(ATTEMPTS):
        path = _name(base, prefix)
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused file name under {base}")


def private_dir(prefix: str) -> str:
    """A new 0700 directory under ``$TMPDIR`` (else /tmp), as ``tempfile.mkdtemp`` makes one: its
    absolute path (the sandbox's tools read it from any directory). A ``$TMPDIR`` that cannot take
    it (missing, not a directory, not writable) is an error, not a reason to write elsewhere."""
    base = os.path.abspath(os.environ.get("TMPDIR") or "/tmp")
    for _attempt in range(ATTEMPTS):
        path = _name(base, prefix)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused directory name under {base}")


def remove_private_dir(folder: str) -> None:
    """Remove a directory made by :func:`private_dir` with what it holds. Its files (links
    included, never followed) are unlinked here, through the directory opened without following a
    link (a sandboxed command shares the file system and could put a link where the directory was:
    the link goes, nothing it points to); only a directory something else made inside it brings in
    ``shutil.rmtree``, which removes a tree without following links out of it. Whatever cannot be
    removed is left."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:  # not a directory any more (a link, a file): remove that name only
        with contextlib.suppress(OSError):
            os.unlink(folder)
        return
    try:
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.rmdir(folder)
    except FileNotFoundError:
        return
    except OSError:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
