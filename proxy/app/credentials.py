"""``--credentials FILE``: loading the secrets file for ``egress run`` and ``egress serve``.

Every failure is a ValueError whose lines name the file, line and credential (never a value): the
command then does not start. See docs/credentials.md.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.credentials.sandbox import Provided
    from proxy.credentials.store import CredentialStore
    from proxy.policy.model import Policy


def add_credentials_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        default=None,
        help="a credentials file (docs/credentials.md): the sandbox gets placeholders, the gate "
        "adds the real values for their bound hosts only",
    )


def load_store(path: str, policy: Policy | None) -> CredentialStore:
    """The credentials declared in ``path``, checked against ``policy`` and with every value read."""
    from proxy.credentials.loader import CredentialsError, load_credentials
    from proxy.credentials.sources import SourceError
    from proxy.credentials.store import CredentialStore

    try:
        return CredentialStore(load_credentials(path, policy))
    except CredentialsError as exc:
        raise ValueError("\n".join(exc.lines())) from None
    except SourceError as exc:
        raise ValueError(f"{path}: {exc}") from None


def sandbox_credentials(path: str | None) -> Any:
    """``RunOptions.credentials`` for ``egress run --credentials PATH`` (None without it)."""
    if path is None:
        return None
    absolute = os.path.abspath(path)

    def setup(policy: Policy | None, sandbox_id: str) -> Provided:
        from proxy.credentials.sandbox import provide

        return provide(load_store(absolute, policy), sandbox_id, absolute)

    return setup


__all__ = ["add_credentials_option", "load_store", "sandbox_credentials"]
