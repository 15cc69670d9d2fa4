"""What a sandbox needs from the gate's trust set-up: the CA bundle to trust when the gate reads its
TLS, and the paths it must not read. A module of its own (no dataclasses) because every ``egress run``
builds one, including a hand-off that imports nothing else of the private gate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from proxy.policy.model import Policy


def _nothing() -> None:
    return None


class Trust(NamedTuple):
    """What the sandbox needs when the gate reads its TLS: a CA bundle to trust (system CAs plus
    the gate's), and the paths it must not read (where the CA key lives)."""

    bundle: str | None  # None: nothing is inspected, the sandbox keeps its own trust store
    hidden: Sequence[str] = ()
    cleanup: Callable[[], None] = _nothing


# Given the private gate's policy (None when joining a gate elsewhere): the trust the sandbox needs.
# Raises ValueError naming the problem when it cannot be set up (the command then does not run).
TrustSetup = Callable[["Policy | None"], Trust | None]
