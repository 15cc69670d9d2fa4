"""The gate's credentials at run time: declarations, current values, issued placeholders, rotation.

Every value is read when the store is built (a source that cannot be read stops the gate from
starting, before any sandbox runs). From then on a file source is re-read when it changes, and
:meth:`CredentialStore.refresh` reads every source again (commands run again): a failed read keeps the
last good value in force. Values from before a rotation are still scrubbed from responses, so a
response echoing the old token shows its placeholder too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from proxy.core.credentials import Credentials, encoded_echoes, placeholder_for
from proxy.credentials.loader import Declaration
from proxy.credentials.sources import SourceError

log = logging.getLogger(__name__)
KEPT_VALUES = 4  # earlier values of a credential still scrubbed from responses after a rotation
MIN_ENCODED = 16  # characters: an encoded form shorter than this is not searched for


class CredentialStore:
    def __init__(self, declarations: Sequence[Declaration]) -> None:
        self.declarations = {d.name: d for d in declarations}
        self._credentials = Credentials({d.name: d.binding for d in declarations})
        self._earlier: dict[str, list[str]] = {d.name: [] for d in declarations}
        self._lock = threading.Lock()
        problems = []
        for declaration in declarations:
            try:
                declaration.source.value()
            except SourceError as exc:
                problems.append(f"credential '{declaration.name}': {exc}")
        if problems:
            raise SourceError("; ".join(problems))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.declarations)

    def credentials(self) -> Credentials:
        return self._credentials

    def value(self, name: str) -> str:
        """The real value to send now (a changed file is read again first)."""
        source = self.declarations[name].source
        before = source._value
        value = source.value()
        if before is not None and value != before:
            self._rotated(name, before)
        return value

    def refresh(self) -> list[str]:
        """Read every source again; the names of the credentials that changed. A failure keeps
        the last good value and is logged (naming the source, never a value)."""
        changed = []
        for name, declaration in self.declarations.items():
            before = declaration.source._value
            try:
                if declaration.source.refresh():
                    changed.append(name)
                    if before is not None:
                        self._rotated(name, before)
            except SourceError as exc:
                log.error("credential '%s' was not refreshed, the last value stays: %s", name, exc)
        if changed:
            log.warning("credentials rotated: %s", ", ".join(changed))
        return changed

    def _rotated(self, name: str, before: str) -> None:
        with self._lock:
            kept = self._earlier[name]
            kept.insert(0, before)
            del kept[KEPT_VALUES:]

    def issue(self, sandbox_id: str | None, key: bytes | None = None) -> dict[str, str]:
        """Placeholders for every credential, for one sandbox: name -> placeholder. Random, or
        with ``key`` derived from it, the sandbox id and the name (the same on every replica)."""
        out = {}
        for name in self.declarations:
            placeholder = self._credentials.placeholder(name, sandbox_id)
            if placeholder is None:
                seed = None
                if key is not None:
                    message = f"{sandbox_id or ''}\0{name}".encode()
                    seed = hmac.new(key, message, hashlib.sha256).digest()
                placeholder = placeholder_for(self.value(name), seed)
                self._credentials.issue(name, sandbox_id, placeholder)
            out[name] = placeholder
        return out

    def scrub_pairs(self, sandbox_id: str | None) -> list[tuple[str, str]]:
        """(real value, placeholder) for every value of every credential, current and earlier: what
        a response to this sandbox must not show. Then the same in the encodings the swap puts a
        value in (Basic credentials' base64, a query's percent-encoding), which an echo returns."""
        pairs = []
        for name in self.declarations:
            placeholder = self._credentials.placeholder(name, sandbox_id) or "[credential]"
            for value in [self.value(name), *self._earlier[name]]:
                pairs.append((value, placeholder))
        return pairs + [echo for real, fake in pairs for echo in encoded_echoes(real, fake)]

    def secret_values(self) -> list[str]:
        """Every value this gate holds (to keep them out of the sandbox's environment)."""
        return [self.value(name) for name in self.declarations]

    def secret_forms(self) -> list[str]:
        """Every value this gate holds, and each in the encodings that hand it over as well: the
        base64 of Basic credentials or of the value alone (standard and URL-safe, at every offset),
        its percent-encoding. An environment variable holding one (``Authorization: Basic ...``
        for git's ``http.extraheader``) holds the value. Encoded forms shorter than
        :data:`MIN_ENCODED` are left out: they would match text that holds nothing."""
        out: list[str] = []
        for real in self.secret_values():
            out.append(real)
            out += [form for form, _ in encoded_echoes(real, real) if len(form) >= MIN_ENCODED]
        return out


KEY_FILE = "credentials.key"


def placeholder_key(state_dir: Path) -> bytes:
    """The key a shared gate derives placeholders with, from its state directory (created once,
    mode 0600; replicas share it as they share the CA). A key others can read is refused."""
    path = state_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
    if os.stat(path).st_mode & 0o077:
        raise OSError(f"{path} is readable by group or others; chmod 600 it")
    key = path.read_bytes()
    if len(key) < 32:
        raise OSError(f"{path} holds fewer than 32 bytes")
    return key


__all__ = ["KEY_FILE", "CredentialStore", "placeholder_key"]
