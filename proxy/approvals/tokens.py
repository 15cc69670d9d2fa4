"""Who may answer approvals: one bearer token per person (or bot), so every answer names who gave it.

The file holds SHA-256 digests only, and must still be private to the gate's user (mode 0600): a gate
whose token file others can read or write refuses to start, since whoever edits it can add themselves.

    version: 1
    admins:
      - name: alice
        token_sha256: 9f86d081...   # `egress admin-token alice` prints a token and this line
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from proxy.approvals.private import NotPrivate, read_private
from proxy.policy import listfile, yamlnodes

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"


class TokenError(ValueError):
    """The token file is unusable; the message names the file and entry."""


@dataclass(frozen=True)
class Admin:
    name: str
    token_sha256: bytes


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class AdminTokens:
    def __init__(self, admins: list[Admin]) -> None:
        if not admins:
            raise TokenError("no admin tokens")
        self.admins = list(admins)

    @classmethod
    def load(cls, path: Path) -> AdminTokens:
        try:
            data = yamlnodes.safe_load(read_private(path, "admin tokens").decode("utf-8"))
        except NotPrivate as exc:
            raise TokenError(str(exc)) from None
        except (yamlnodes.YAMLError, UnicodeDecodeError) as exc:
            raise TokenError(f"{path}: cannot read admin tokens: {exc}") from None
        entries = listfile.entries(data, path, "admins", TokenError)
        admins: list[Admin] = []
        for index, entry in enumerate(entries):
            where = f"{path}: admins[{index}]"
            if not isinstance(entry, dict) or set(entry) - {"name", "token_sha256"}:
                raise TokenError(f"{where}: expected a mapping with 'name' and 'token_sha256'")
            name, hexdigest = entry.get("name"), entry.get("token_sha256")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise TokenError(f"{where}: 'name' must be {NAME_RULE}, not {name!r}")
            if not isinstance(hexdigest, str) or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
                raise TokenError(f"{where} ({name}): 'token_sha256' must be 64 lower-case hex")
            if any(a.name == name for a in admins):
                raise TokenError(f"{where}: duplicate name {name!r}")
            admins.append(Admin(name, bytes.fromhex(hexdigest)))
        return cls(admins)

    def authenticate(self, header: str | None) -> str | None:
        """The name an ``Authorization: Bearer TOKEN`` value proves, or None."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.name_of(token)

    def name_of(self, token: str) -> str | None:
        """The name a token proves, or None. Every entry is compared (in constant time) whatever the
        token, so timing says nothing about which one nearly matched."""
        if not token.strip():
            return None
        presented = digest(token.strip())
        found: str | None = None
        for admin in self.admins:
            if hmac.compare_digest(presented, admin.token_sha256):
                found = admin.name
        return found
