"""Per-sandbox identities on a shared gate.

A shared ``egress serve`` tells sandboxes apart by a per-sandbox credential sent as proxy Basic auth
(``http://ID:TOKEN@gate:3128`` in ``HTTPS_PROXY``), never by a header or source address a sandbox could
forge to claim another's identity. The file holds only SHA-256 digests of the tokens, so reading it does not
let anyone impersonate a sandbox; comparison is constant-time.

File format (YAML)::

    version: 1
    sandboxes:
      - id: agent-7
        token_sha256: 9f86d081...      # `egress token agent-7` prints a token and this line
        policy: policies/agent-7.yaml  # optional; relative to this file; default: the gate's policy
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from proxy.core.sandbox_id import SANDBOX_ID_RULE, is_sandbox_id
from proxy.policy import listfile, yamlnodes


class IdentityError(ValueError):
    """The identities file is unusable; the message names file and entry."""


@dataclass(frozen=True)
class Sandbox:
    id: str
    token_sha256: bytes
    policy: Path | None = None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Identities:
    def __init__(self, sandboxes: list[Sandbox]) -> None:
        self.by_id = {s.id: s for s in sandboxes}

    @classmethod
    def load(cls, path: Path) -> Identities:
        try:
            data = yamlnodes.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yamlnodes.YAMLError) as exc:
            raise IdentityError(f"{path}: cannot read identities: {exc}") from exc
        entries = listfile.entries(data, path, "sandboxes", IdentityError)
        sandboxes: list[Sandbox] = []
        for index, entry in enumerate(entries):
            where = f"{path}: sandboxes[{index}]"
            if not isinstance(entry, dict):
                raise IdentityError(f"{where}: expected a mapping")
            unknown = set(entry) - {"id", "token_sha256", "policy"}
            if unknown:
                raise IdentityError(f"{where}: unknown key(s) {sorted(unknown)}")
            sid, digest = entry.get("id"), entry.get("token_sha256")
            if not isinstance(sid, str) or not is_sandbox_id(sid):
                raise IdentityError(f"{where}: 'id' must be {SANDBOX_ID_RULE}, not {sid!r}")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise IdentityError(
                    f"{where} ({sid}): 'token_sha256' must be 64 lower-case hex digits"
                )
            policy = entry.get("policy")
            if policy is not None and not isinstance(policy, str):
                raise IdentityError(f"{where} ({sid}): 'policy' must be a path")
            if any(s.id == sid for s in sandboxes):
                raise IdentityError(f"{where}: duplicate sandbox id {sid!r}")
            sandboxes.append(
                Sandbox(
                    id=sid,
                    token_sha256=bytes.fromhex(digest),
                    policy=(path.parent / policy) if policy else None,
                )
            )
        return cls(sandboxes)

    def authenticate(self, header: str | None) -> Sandbox | None:
        """The sandbox a ``Proxy-Authorization: Basic ...`` value proves, or None."""
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        sid, sep, token = decoded.partition(":")
        sandbox = self.by_id.get(sid)
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        expected = sandbox.token_sha256 if sandbox else bytes(32)
        ok = hmac.compare_digest(digest, expected)  # same work whether or not the id exists
        return sandbox if (ok and sep and sandbox is not None) else None
