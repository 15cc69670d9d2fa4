"""Reading a file that must be private to the gate's user (admin tokens, the webhook secret).

Whoever can change the tokens file can make themselves an approver, and whoever can read the webhook
secret can forge answers' notifications: a file that group or others can read or write is refused,
and the gate does not start, rather than trusting it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotPrivate(ValueError):
    """The file is missing, unreadable or open to other users; the message names it and the fix."""


def read_private(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of ``path`` (``what`` names it in messages), from the same open file whose mode was
    checked, so it cannot be swapped in between."""
    target = Path(path)
    try:
        with target.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise NotPrivate(
                    f"{target}: mode {stat.S_IMODE(mode):04o} lets other users read or change "
                    f"the {what}; run chmod 600 {target}"
                )
            return handle.read()
    except OSError as exc:
        raise NotPrivate(f"{target}: cannot read the {what}: {exc.strerror or exc}") from None
