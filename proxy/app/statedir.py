"""The gate's state directory: everything it writes besides the journal and the decision log.

That is mitmproxy's ``confdir``, which holds the inspection CA (:mod:`proxy.app.ca`: its key never
leaves the gate; ``egress run`` hides this directory from the sandbox). Containers run the gate as an
unprivileged user with a read-only root file system and no writable home, so the directory is explicit
(``--state-dir``, ``$EGRESS_STATE_DIR``; an emptyDir, tmpfs or volume in the deployments) instead of an
implicit ``~/.mitmproxy``. It is prepared before anything listens: a directory that cannot be created
or written stops start-up with its name, rather than a gate that dies later inside mitmproxy.
"""

from __future__ import annotations

import os
import pwd

from proxy.runtime.scratch import create_exclusive

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

ENV_VAR = "EGRESS_STATE_DIR"
CONFDIR_NAME = "mitmproxy"
_APP = "agent-egress"


class StateDirError(Exception):
    """The state directory cannot be determined, created or written."""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EGRESS_STATE_DIR``, else ``$XDG_STATE_HOME/agent-egress``, else ``~/.local/state/agent-egress``
    (the XDG base-directory default; a relative ``XDG_STATE_HOME`` is invalid there and ignored)."""
    from pathlib import Path

    return Path(_default_state_dir(os.environ if environ is None else environ))


def _default_state_dir(env: Mapping[str, str]) -> str:
    """:func:`default_state_dir` as a string: `egress run` decides what to hide with it without
    importing pathlib (docs/startup.md)."""
    if explicit := env.get(ENV_VAR):
        return explicit
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, _APP)
    home = env.get("HOME") or _passwd_home()
    if not home or not os.path.isabs(home):
        raise StateDirError(
            f"no state directory: HOME is not set; pass --state-dir or set {ENV_VAR}"
        )
    return os.path.join(home, ".local", "state", _APP)


def real_state_dir(chosen: str | None = None) -> str | None:
    """``chosen``, else the default, by its real path (symbolic links resolved, as far as it
    exists); None when there is no default (no HOME). ``egress run`` resolves it once, before the
    sandbox exists: the sandbox may replace a link on the way, and its gate, which finishes its
    start after the command has started, must use the directory that was hidden and pinned."""
    try:
        state = chosen if chosen else _default_state_dir(os.environ)
    except StateDirError:
        return None
    return os.path.realpath(state)


def state_dir_to_hide(chosen: str | None = None) -> str | None:
    """The state directory (``chosen``, else the default) for a sandbox that joins a gate elsewhere,
    created (mode 0700) when it does not exist yet: such a sandbox must not read this user's own
    gate state (its CA key), and must not make it either. A directory the command created where
    none was would be the state of this user's next gate of its own: the approved rules it reads
    (an ``approved.yaml`` granting the command's own ask rules, nobody asked) and its CA. The path
    is returned when it exists in any form (a dangling link cannot be hidden, and the run then
    does not start); None when there is no default (no HOME) or it cannot be made (then the
    command, running as the same user, cannot make it either)."""
    try:
        state = chosen if chosen else _default_state_dir(os.environ)
    except StateDirError:
        return None
    try:
        os.makedirs(state, mode=0o700, exist_ok=True)
    except OSError:
        return state if os.path.lexists(state) else None
    return state


def _passwd_home() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def prepare_state_dir(path: Path) -> Path:
    """Create ``path`` and its mitmproxy confdir (mode 0700: the CA key lives there) if needed and prove
    both writable with a real write. Returns the absolute state directory."""
    path = path.absolute()
    confdir = path / CONFDIR_NAME
    for directory in (path, confdir):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, probe = create_exclusive(directory, ".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except FileExistsError:
            raise StateDirError(f"state directory {directory}: not a directory") from None
        except OSError as exc:
            raise StateDirError(f"state directory {directory}: {exc.strerror or exc}") from None
    return path


def mitmproxy_confdir(state_dir: Path) -> Path:
    return state_dir / CONFDIR_NAME
