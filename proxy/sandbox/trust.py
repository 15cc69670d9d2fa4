"""What a sandbox needs from the gate's trust set-up: the CA bundle to trust when the gate reads its
TLS, and the paths it must not read. A module of its own, with a plain class (no dataclasses, no
typing), because every ``egress run`` builds one, including a hand-off that imports nothing else of
the private gate."""

from __future__ import annotations

from collections.abc import Callable

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
