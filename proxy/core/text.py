"""The one escaper for untrusted text shown to people or machines.

Host names, paths, methods and server names come from the sandbox. Wherever they are echoed (refusal
bodies, headers, terminal summaries, DNS error text, log details) they pass through :func:`escape`, so a
hostile value can neither forge a line, a header or a terminal control sequence, nor be confused with
another value: a backslash is doubled, so ``\\x1f`` written by a client and the escape of byte 0x1f never
look alike.
"""

from __future__ import annotations

MAX_SHOWN = 256


def escape(raw: object, limit: int = MAX_SHOWN) -> str:
    """Printable ASCII only, unambiguous escapes, at most ``limit`` characters plus ``...``."""
    text = raw if isinstance(raw, str) else repr(raw)
    if text.isascii() and text.isprintable() and "\\" not in text and len(text) <= limit:
        return text  # the common case: nothing to escape
    out: list[str] = []
    used = 0
    for ch in text:
        piece = _escape_char(ch)
        if used + len(piece) > limit:
            return "".join(out) + "..."
        out.append(piece)
        used += len(piece)
    return "".join(out)


def _escape_char(ch: str) -> str:
    if " " <= ch < "\x7f":
        return "\\\\" if ch == "\\" else ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


__all__ = ["MAX_SHOWN", "escape"]
