"""Values made safe to leave the host: no secrets, no control characters, bounded length.

The journal keeps what was received (it is local evidence, mode 0600); everything exported over OTLP
passes through here first: userinfo is stripped, query *values* are dropped (names kept), every string
is length-capped and control characters (and every other character that is not printable: line
separators, bidi and format characters) are escaped, so a value cannot forge lines in a collector's
text output.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MAX_TEXT = 256
MAX_PATH = 1024
MAX_HOST = 255
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def scrub_text(value: object, limit: int = MAX_TEXT) -> str:
    """Escape control characters and cap the length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text  # the common case, without building a new string
    text = text.translate(_CONTROL)
    if not text.isprintable():
        # Line and paragraph separators, bidi overrides and other invisible format characters
        # break or reorder lines in a viewer as a newline would (a process's argv is the
        # sandbox's to choose); a lone surrogate could not be encoded at all.
        text = "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def scrub_host(host: object) -> str:
    """A host as an attribute: any ``user:password@`` prefix removed."""
    return scrub_text(str(host).rpartition("@")[2], MAX_HOST)


def scrub_query(query: str) -> str:
    """Query parameter names only: ``a=1&token=s3cr3t`` -> ``a=&token=``."""
    names = [part.partition("=")[0] for part in query.split("&") if part]
    return "&".join(f"{name}=" for name in names)


def scrub_url(target: str) -> tuple[str, str | None]:
    """(path, query-without-values) of a request target, absolute-form URLs included; userinfo and
    fragment dropped."""
    parts = urlsplit(target)
    query = scrub_query(parts.query) if parts.query else None
    if parts.scheme and parts.netloc:
        netloc = parts.netloc.rpartition("@")[2]
        path = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    else:
        path = parts.path
    return scrub_text(path, MAX_PATH), scrub_text(query, MAX_PATH) if query is not None else None
