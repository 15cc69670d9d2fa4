"""The journal's hash chain: the exact bytes of a record and the hash that links it to the one before.

Every line carries ``seq`` (1, 2, 3, ... with no gaps), ``prev`` (the hash of the previous line, 64 zeros
for the first) and ``hash``: SHA-256 over the canonical JSON of the line without ``hash`` (sorted keys, no
spaces, ASCII only). Editing, removing or reordering a line breaks the chain. The writer and
``egress audit verify`` both use these functions, so what is written is what is checked.

Known limit of any hash chain: deleting whole lines from the *end* of the newest file leaves a valid,
shorter chain. Compare the last ``seq`` with an external anchor (the exported OTel events carry
``egress.journal.seq``) to detect that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64
CHAIN_KEYS = ("seq", "prev", "hash")
# The event that takes back a record whose write could not be made durable (what it recorded did not
# stand): written into the journal when the record could not be removed from it, or made by a
# follower that had read the record before it was removed (proxy.evidence.journal.follower).
RETRACTED_EVENT = "egress.journal.retracted"
RETRACTED_BECAUSE = (
    "its write could not be made durable, and the gate acts on nothing it cannot record "
    "(--audit-required), so an allow it recorded was refused; a refusal it recorded stands"
)

# check_circular only changes which error a circular record raises (records never are): off, it saves
# the encoder's bookkeeping for every object it writes.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str, check_circular=False
)


def canonical(body: dict[str, Any]) -> str:
    """The exact text that is hashed. ASCII only: control characters and non-ASCII are escaped, so a
    hostile host name cannot forge a line."""
    return _ENCODER.encode(body)


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def _with_hash(text: str, digest: str) -> str:
    return f'{text[:-1]}{"," if len(text) > 2 else ""}"hash":"{digest}"}}\n'


def render(body: dict[str, Any], digest: str) -> str:
    """The line as written: the canonical body with ``hash`` appended last, newline-terminated."""
    return _with_hash(canonical(body), digest)


def seal(body: dict[str, Any]) -> tuple[str, bytes]:
    """(hash, line) of a record, encoding it once: this runs for every decision."""
    digest, _, line = seal_text(body)
    return digest, line


def seal_text(body: dict[str, Any]) -> tuple[str, bytes, bytes]:
    """(hash, hashed text, line) of a record: the text is the line without its ``hash``, which the
    decision log writes as it is (:mod:`proxy.evidence.serialised`)."""
    return seal_encoded(canonical(body).encode("ascii"))


def seal_encoded(text: bytes) -> tuple[str, bytes, bytes]:
    """:func:`seal_text` of a record already encoded: ``text`` is its canonical JSON, chain fields
    (``seq``, ``prev``) included."""
    digest = hashlib.sha256(text).hexdigest()
    return (
        digest,
        text,
        b'%s%s"hash":"%s"}\n'
        % (
            text[:-1],
            b"," if len(text) > 2 else b"",
            digest.encode("ascii"),
        ),
    )
