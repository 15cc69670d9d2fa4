"""What a sandbox needs from the gate's trust set-up: the CA bundle to trust when the gate reads its
TLS, and the paths it must not read. A module of its own, with a plain class (no dataclasses, no
typing), because every ``egress run`` builds one, including a hand-off that imports nothing else of
the private gate.

The bundle a run writes goes to a directory of its own (:mod:`proxy.runtime.scratch`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from proxy.runtime.scratch import private_dir, remove_private_dir

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Sequence

    from proxy.policy.model import Policy


def _nothing() -> None:
    return None


class Trust:
    """What the sandbox needs when the gate reads its TLS: a CA bundle to trust (system CAs plus
    the gate's), and the paths it must not read (where the CA key lives)."""

    __slots__ = ("bundle", "cleanup", "hidden")

    def __init__(
        self,
        bundle: str | None,  # None: nothing is inspected, the sandbox keeps its own trust store
        hidden: Sequence[str] = (),
        cleanup: Callable[[], None] = _nothing,
    ) -> None:
        self.bundle = bundle
        self.hidden = hidden
        self.cleanup = cleanup

    def __repr__(self) -> str:
        return f"Trust(bundle={self.bundle!r}, hidden={self.hidden!r})"


# Given the private gate's policy (None when joining a gate elsewhere): the trust the sandbox needs.
# Raises ValueError naming the problem when it cannot be set up (the command then does not run).
TrustSetup = Callable[["Policy | None"], Trust | None]


BUNDLE_NAME = "ca-bundle.pem"


def untrusted(exc: Exception) -> ValueError:
    """What a :data:`TrustSetup` raises when the sandbox's trust cannot be set up."""
    return ValueError(f"cannot set up the sandbox's trust in the gate's CA: {exc}")


def pem_bundle(sources: Iterable[str | os.PathLike[str]]) -> bytes:
    """The PEM files ``sources``, one after the other, each ending in one newline."""
    parts = []
    for source in sources:
        with open(source, "rb") as pem:
            parts.append(pem.read().rstrip(b"\n") + b"\n")
    return b"".join(parts)


def bundle_trust(sources: Iterable[str | os.PathLike[str]], hidden: Sequence[str]) -> Trust:
    """A run's trust with a bundle of ``sources`` (the system's CAs and the gate's), written to a
    new directory only this user can enter; its ``cleanup`` removes both. OSError or ValueError (a
    path the system cannot take) when it cannot be written; nothing is left behind then."""
    folder = private_dir("egress-trust-")
    try:
        bundle = os.path.join(folder, BUNDLE_NAME)
        data = pem_bundle(sources)
        fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as out:
            os.fchmod(fd, 0o644)  # readable by the sandbox's tools whatever the umask
            out.write(data)
    except BaseException:
        remove_private_dir(folder)
        raise
    return Trust(bundle=bundle, hidden=tuple(hidden), cleanup=lambda: remove_private_dir(folder))
