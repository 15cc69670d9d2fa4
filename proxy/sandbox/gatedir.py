"""Where this user's shared gate lives, and the checks on that directory (``egress run --reuse-gate``,
:mod:`proxy.sandbox.usergate`). A module of its own, with nothing but ``os`` and ``stat``, because
every isolated ``egress run`` hides the directory in its sandbox, whichever gate serves it.
"""

from __future__ import annotations

import contextlib
import os
import stat

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Mapping


class UserGateError(Exception):
    """The per-user gate cannot be used (its directory is unsafe, it did not start, it answered
    nonsense); the run gets a private gate instead, and the message says why."""


def gate_dir(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    base = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(base):
        return os.path.join(base, "agent-egress")
    return f"/tmp/agent-egress-{os.geteuid()}"


def private_dir(path: str) -> str:
    """``path``, created 0700 if missing; UserGateError unless it is a real directory owned by this
    user with no access for anyone else (a directory planted by another user is never trusted)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:  # XDG_RUNTIME_DIR missing or not ours to write: no shared gate
        raise UserGateError(f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise UserGateError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserGateError(f"{path}: not a directory")
    if info.st_uid != os.geteuid():
        raise UserGateError(f"{path}: owned by uid {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & 0o077:
        raise UserGateError(f"{path}: mode {stat.S_IMODE(info.st_mode):o}, expected 700")
    return path


def runtime_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """This user's ``XDG_RUNTIME_DIR`` (``/run/user/UID`` where the variable is unset, as under
    sudo or cron) when it is one as the XDG specification says (an absolute path to a directory
    owned by this user, mode 0700), else None. It holds the user's service
    sockets by path: the systemd user manager and the D-Bus session bus (``systemd-run --user``
    starts a command outside any sandbox), the SSH, GPG and keyring agents. A sandbox runs as the
    same user, so the whole directory is hidden in every sandbox."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_RUNTIME_DIR", "") or f"/run/user/{os.geteuid()}"  # unset under sudo, cron
    if not os.path.isabs(base):
        return None
    try:
        info = os.stat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return None
    return os.path.realpath(base)


def hidden_dirs(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The per-user gate directories to hide in every sandbox (a run with its own gate included):
    this environment's, created now if missing (a sandbox must never be the one to create it: it
    could plant a gate of its own there), and the fallback in /tmp if it exists."""
    out: list[str] = []
    with contextlib.suppress(UserGateError):
        out.append(private_dir(gate_dir(environ)))
    fallback = f"/tmp/agent-egress-{os.geteuid()}"
    if fallback not in out and os.path.isdir(fallback):
        out.append(fallback)
    return tuple(out)
