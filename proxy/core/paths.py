"""Request targets in one canonical form, and the path globs request rules match against it.

A path rule is only as strong as the agreement between the gate and the server about which resource a
target names. Servers disagree about ``%2F``, ``\\``, ``;`` parameters, dot segments and ``//``, so a
target that spells any of those has no canonical form here: it is *ambiguous*, never normalised into
something a rule could allow. What is unambiguous is decoded once (``%41`` is ``A``), so equivalent
spellings decide alike.

Two levels of trouble:

- :class:`Unreadable`: the target cannot be read at all (broken percent-encoding, control characters or
  NUL anywhere, over-long): the request is refused outright.
- an ambiguous *path* (``Target.path is None``): rules with ``paths`` never allow it and deny rules with
  ``paths`` treat it as matching; rules that do not look at the path still apply. npm's scoped package
  names (``/@scope%2fname``) stay usable under a rule that allows any GET.

Pure and cached: the same target strings recur on every keep-alive request.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MAX_TARGET = 8192  # bytes of request target; a longer one is unreadable
MAX_PATH = 4096  # a longer path has no canonical form
MAX_QUERY_PARAMS = 256

_HEX = frozenset("0123456789abcdefABCDEF")
# Percent-encoded bytes whose decoded meaning differs between servers: refused in paths.
_AMBIGUOUS_ENCODED = {
    0x2F: "an encoded '/' (%2F)",
    0x5C: "an encoded '\\' (%5C)",
    0x2E: "an encoded '.' (%2E)",
    0x3B: "an encoded ';' (%3B)",
    0x25: "a double-encoded '%' (%25)",
    0x3F: "an encoded '?' (%3F)",
    0x23: "an encoded '#' (%23)",
}


class Unreadable(ValueError):
    """A request target no server reads the same way; the message says why."""


@functools.lru_cache(maxsize=1024)
def php_name(name: str) -> str:
    """A decoded parameter's name (of a query or a form) folded the way any common server could
    read it: case ignored; and as PHP registers it - ``+`` is a space, leading spaces are dropped,
    ``.`` and a space are ``_``, a leading ``[`` is ``_``, and ``name[...]`` is ``name`` (an array,
    or with an unmatched ``[``, ``name_`` - taken for ``name`` too: folding more only makes a rule
    see more copies); and as PHP stores it, up to its first NUL (``_method%00x`` is ``_method``)."""
    key = name.split("\x00", 1)[0]
    key = key.replace("+", " ").lstrip(" ").lower().replace(".", "_").replace(" ", "_")
    if key.startswith("["):
        key = "_" + key[1:]
    return key.split("[", 1)[0]


@dataclass(frozen=True, slots=True)
class Query:
    """Decoded query parameters in order; ``None`` values are parameters without ``=``."""

    params: tuple[tuple[str, str | None], ...] = ()

    def values(self, name: str) -> list[str | None]:
        """Every value of ``name``, matched case-insensitively (servers differ on case) and as PHP
        names a parameter (:func:`php_name`): ``?+service=x`` is ``service`` there."""
        wanted = php_name(name)
        return [value for key, value in self.params if php_name(key) == wanted]

    def names(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.params)


@dataclass(frozen=True, slots=True)
class Target:
    """A request target split into its canonical path (or why it has none) and its query."""

    path: str | None  # decoded, canonical; None when ambiguous
    problem: str | None  # why the path is ambiguous
    query: Query
    raw_path: str
    raw_query: str | None


@functools.lru_cache(maxsize=1024)
def parse_target(target: str) -> Target:
    """Split and check an origin-form request target (``/path?query``); raises :class:`Unreadable`."""
    if len(target) > MAX_TARGET:
        raise Unreadable(f"request target longer than {MAX_TARGET} bytes")
    for ch in target:
        if ch <= " " or ch == "\x7f":
            raise Unreadable("control character or space in the request target")
        if ch >= "\x80":
            raise Unreadable("non-ASCII character in the request target")
    raw_path, sep, raw_query = target.partition("?")
    if "#" in target:
        raise Unreadable("a fragment ('#') in the request target")
    query = _parse_query(raw_query) if sep else Query()
    try:
        path = canonical_path(raw_path)
    except Ambiguous as exc:
        return Target(None, str(exc), query, raw_path, raw_query if sep else None)
    return Target(path, None, query, raw_path, raw_query if sep else None)


class Ambiguous(ValueError):
    """A path whose meaning depends on the server."""


def canonical_path(raw: str) -> str:
    """The decoded path, or :class:`Ambiguous` naming the spelling that has no canonical form.

    Raises :class:`Unreadable` for what makes the whole request unreadable (bad escapes, NUL)."""
    if not raw.startswith("/"):
        raise Ambiguous(f"the path {raw[:40]!r} does not start with '/'")
    if len(raw) > MAX_PATH:
        raise Ambiguous(f"a path longer than {MAX_PATH} bytes")
    if "\\" in raw:
        raise Ambiguous("a backslash in the path")
    if ";" in raw:
        raise Ambiguous("a ';' path parameter")
    decoded = _decode_path(raw) if "%" in raw else raw
    segments = decoded[1:].split("/")
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise Ambiguous(f"a dot segment ('{segment}') in the path")
        if not segment and i != len(segments) - 1:
            raise Ambiguous("an empty path segment ('//')")
    return decoded


def _decode_path(raw: str) -> str:
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        byte = _escape_at(raw, i)
        if byte in _AMBIGUOUS_ENCODED:
            raise Ambiguous(f"{_AMBIGUOUS_ENCODED[byte]} in the path")
        if byte >= 0x80:
            raise Ambiguous("a percent-encoded non-ASCII byte in the path")
        out.append(chr(byte))
        i += 3
    return "".join(out)


def _escape_at(text: str, i: int) -> int:
    """The byte of the ``%HH`` escape at ``i``; broken or control-character escapes are unreadable."""
    pair = text[i + 1 : i + 3]
    if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
        raise Unreadable(f"a malformed percent-escape {text[i : i + 3]!r}")
    byte = int(pair, 16)
    if byte < 0x20 or byte == 0x7F:
        raise Unreadable(f"an encoded control character (%{pair}) in the request target")
    return byte


def _parse_query(raw: str) -> Query:
    """``&`` and ``;`` both separate parameters (servers differ, so either counts)."""
    if not raw:
        return Query()
    parts = re.split("[&;]", raw)
    if len(parts) > MAX_QUERY_PARAMS:
        raise Unreadable(f"more than {MAX_QUERY_PARAMS} query parameters")
    params: list[tuple[str, str | None]] = []
    for part in parts:
        if not part:
            continue
        name, eq, value = part.partition("=")
        params.append((_decode_component(name), _decode_component(value) if eq else None))
    return Query(tuple(params))


def _decode_component(raw: str) -> str:
    if "%" not in raw:
        return raw
    data = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            data.append(_escape_at(raw, i))
            i += 3
        else:
            data += ch.encode("ascii")
            i += 1
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable("a query parameter that is not UTF-8") from None


# -- globs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathGlob:
    """``/org/*/info/refs``: ``*`` is one segment (or part of one), ``**`` any number of segments."""

    text: str
    insensitive: bool
    pattern: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.pattern.fullmatch(path) is not None

    def __str__(self) -> str:
        return self.text


_GLOB_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/]*$")


def compile_glob(text: str, *, insensitive: bool = False) -> PathGlob:
    """Check and compile one path glob; ValueError says what is wrong with it."""
    if not text.startswith("/"):
        raise ValueError(f"{text!r}: a path starts with '/'")
    if len(text) > MAX_PATH:
        raise ValueError(f"{text[:40]!r}...: longer than {MAX_PATH} characters")
    if not _GLOB_CHARS.match(text):
        raise ValueError(
            f"{text!r}: paths are written decoded, without '%', ';', '?', '#', '\\' or spaces "
            "(a request spelling those is ambiguous and never matches)"
        )
    segments = text[1:].split("/")
    parts: list[str] = []
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            raise ValueError(f"{text!r}: dot segments never match (requests with them are refused)")
        if not segment and i != len(segments) - 1:
            raise ValueError(f"{text!r}: '//' never matches (requests with it are refused)")
        if segment == "**":
            parts.append("(?:/[^/]*)*")
        elif "**" in segment:
            raise ValueError(f"{text!r}: '**' must be a whole segment ('/a/**/b')")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + _segment(segment))
    flags = re.ASCII | (re.IGNORECASE if insensitive else 0)
    return PathGlob(text, insensitive, re.compile("".join(parts), flags))


def _segment(segment: str) -> str:
    """One segment's pattern, matched in time linear in the request's segment whatever its ``*``s:
    written as ``[^/]*`` each, ``a*b*c*d`` backtracks over every split of the segment between them
    (``/*-*-*.tar.gz`` against 1,000 dashes: 0.3 s, cubic in the length). The pieces between the
    first and the last ``*`` are taken at their first place after the one before, never tried
    elsewhere (an atomic group): where any placement matches, that one does, as it leaves the most
    room to the pieces after it."""
    if "*" not in segment:
        return re.escape(segment)
    first, *middle, last = segment.split("*")
    found = "".join(f"(?>[^/]*?{re.escape(piece)})" for piece in middle)
    return re.escape(first) + found + "[^/]*" + re.escape(last)


__all__ = [
    "MAX_PATH",
    "MAX_TARGET",
    "Ambiguous",
    "PathGlob",
    "Query",
    "Target",
    "Unreadable",
    "canonical_path",
    "compile_glob",
    "parse_target",
    "php_name",
]
