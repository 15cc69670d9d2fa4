"""Canonical destination names: the one spelling every later step (matching, resolving, logging) sees.

The client controls the host string, so any two spellings that reach the same destination must come
out identical here, and anything another component could read differently (a resolver, curl, a
browser, ``inet_aton``) must be rejected rather than guessed. Rules follow the WHATWG URL host parser
where it is stricter than DNS: a name whose last label is a number is an IPv4 literal or nothing.

Plain lower-case ASCII names take a regex fast path; only Unicode input and ``xn--`` labels pay for
IDNA 2008 (UTS #46) processing, and only they import ``idna`` here (~5 ms that a gate's start no
longer pays; dnspython loads it too, at a gate's first DNS question or lookup). Results are cached:
the function is pure on ``str``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address
from types import ModuleType

__all__ = ["InvalidHost", "canonical_host", "parse_endpoint", "split_authority"]

_MAX_NAME = 253  # octets, without the trailing dot (RFC 1035 255 on the wire)
_MAX_LABEL = 63
# Unicode input can map to fewer characters (ignored code points), so it gets more room before the
# octet limits apply; the bound only keeps IDNA work per call small.
_MAX_RAW_UNICODE = 1024

# One LDH label, underscore allowed (``_dmarc``, ``_acme-challenge``), no leading/trailing hyphen.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_LABEL_CHARS_RE = re.compile(r"[a-z0-9_-]+")
_LABEL_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_HEX_RE = re.compile(r"[0-9a-f]*")
_OCT_RE = re.compile(r"[0-7]*")
_DEC_RE = re.compile(r"[0-9]+")


class InvalidHost(ValueError):
    """A destination name or authority that must not be matched, resolved or connected to."""


_IDNA_BROKEN = (ImportError, SyntaxError)  # idna missing or damaged (it imports tables lazily too)


def _idna() -> ModuleType:
    """``idna``, imported by the first name that needs it; a name it cannot check is refused."""
    try:
        import idna
    except _IDNA_BROKEN as err:
        raise _unchecked(err) from None
    return idna


def _unchecked(err: Exception) -> InvalidHost:
    return InvalidHost(f"internationalised names cannot be checked here: {err}")


def canonical_host(raw: str) -> str | IPv4Address | IPv6Address:
    """Return the canonical form of an untrusted host, or raise InvalidHost saying why.

    Names come back lower-case, punycode (IDNA 2008), without the trailing dot. Every IPv4
    spelling (decimal, hex, octal, short, mixed) becomes an IPv4Address, IPv6 (bracketed or not) an
    IPv6Address, and IPv4-mapped IPv6 the embedded IPv4Address so that one policy check covers both.
    """
    if not isinstance(raw, str):
        raise InvalidHost(f"host must be a string, not {type(raw).__name__}")
    return _canonical(raw)


@lru_cache(maxsize=4096)
def _canonical(raw: str) -> str | IPv4Address | IPv6Address:
    if not raw:
        raise InvalidHost("empty host")
    ascii_input = raw.isascii()
    if ascii_input:
        if len(raw) > _MAX_NAME + 1:
            raise InvalidHost(f"host longer than {_MAX_NAME} octets")
        if not raw.isprintable() or " " in raw:
            bad = next((ch for ch in raw if not ch.isprintable() or ch == " "), " ")
            raise InvalidHost(f"host contains a control or whitespace character U+{ord(bad):04X}")
    else:
        if len(raw) > _MAX_RAW_UNICODE:
            raise InvalidHost(f"host longer than {_MAX_RAW_UNICODE} characters")
        _reject_unicode_controls(raw)
    if "@" in raw:
        raise InvalidHost("host contains '@' (userinfo is not allowed)")
    if raw[0] == "[":
        end = raw.find("]")
        if end < 0:
            raise InvalidHost("'[' without closing ']'")
        if end != len(raw) - 1:
            raise InvalidHost(f"unexpected text after ']': {raw[end + 1 :][:20]!r}")
        return _ipv6(raw[1:-1])
    if ":" in raw:
        return _ipv6(raw)
    if "%" in raw:
        raise InvalidHost("host contains '%' (percent-encoding is not allowed)")
    if ascii_input:
        name = raw.lower()
    else:
        idna = _idna()
        try:
            name = idna.uts46_remap(raw, std3_rules=False, transitional=False)
        except idna.IDNAError as err:
            raise InvalidHost(f"not a valid internationalised name: {err}") from None
        except _IDNA_BROKEN as err:
            raise _unchecked(err) from None
    return _finish(name)


def _reject_unicode_controls(raw: str) -> None:
    """Controls, separators and whitespace never belong in a name, in any script.

    Format characters (Cf) are left to UTS #46, which drops the invisible ones (soft hyphen, zero
    width space) exactly as browsers do and rejects the rest (bidi overrides).
    """
    for ch in raw:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Zs", "Zl", "Zp") or (ch.isascii() and ch.isspace()):
            raise InvalidHost(f"host contains a control or whitespace character U+{ord(ch):04X}")


def _finish(name: str) -> str | IPv4Address:
    """Validate a case-folded (UTS #46-mapped) name; decide IPv4 literal versus DNS name."""
    if name.endswith("."):
        name = name[:-1]
        if not name:
            raise InvalidHost("host is only a dot")
    labels = name.split(".")
    if _ends_in_number(labels[-1]):
        return _ipv4(labels)
    if name.isascii() and "xn--" not in name:
        if len(name) <= _MAX_NAME and _NAME_RE.fullmatch(name):
            return name
        for label in labels:  # say which label is wrong and how
            _check_ldh_label(label)
        if len(name) > _MAX_NAME:
            raise InvalidHost(f"name longer than {_MAX_NAME} octets ({len(name)})")
        raise InvalidHost(f"invalid host name {name!r}")  # unreachable unless the rules disagree
    out = [_label_to_ascii(label) for label in labels]
    result = ".".join(out)
    if _ends_in_number(out[-1]):  # e.g. fullwidth digits mapped by UTS #46
        return _ipv4(out)
    if len(result) > _MAX_NAME:
        raise InvalidHost(f"name longer than {_MAX_NAME} octets after punycode ({len(result)})")
    return result


def _label_to_ascii(label: str) -> str:
    if label.isascii():
        if label.startswith("xn--"):
            if len(label) > _MAX_LABEL:
                raise InvalidHost(f"label longer than {_MAX_LABEL} octets: {label[:20]}...")
            idna = _idna()
            try:
                idna.ulabel(label)  # decodes, checks IDNA 2008 and that it is the canonical A-label
            except (idna.IDNAError, UnicodeError, *_IDNA_BROKEN) as err:
                raise InvalidHost(f"invalid punycode label {label!r}: {err}") from None
            return label
        _check_ldh_label(label)
        return label
    if not label:
        raise InvalidHost("empty label")
    idna = _idna()
    try:
        encoded: str = idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError, *_IDNA_BROKEN) as err:
        raise InvalidHost(f"label {label!r} is not valid IDNA 2008: {err}") from None
    if len(encoded) > _MAX_LABEL:
        raise InvalidHost(f"label longer than {_MAX_LABEL} octets after punycode")
    return encoded


def _check_ldh_label(label: str) -> None:
    """Raise InvalidHost naming the first hostname rule an ASCII label breaks."""
    if not label:
        raise InvalidHost("empty label")
    if len(label) > _MAX_LABEL:
        raise InvalidHost(f"label longer than {_MAX_LABEL} octets ({len(label)})")
    if not _LABEL_CHARS_RE.fullmatch(label):
        bad = next((ch for ch in label if ch not in _LABEL_ALPHABET), "?")
        raise InvalidHost(f"character {bad!r} is not allowed in a host name")
    if label[0] == "-" or label[-1] == "-":
        raise InvalidHost(f"label {label!r} starts or ends with a hyphen")


# --- IPv4: the WHATWG URL standard's parser, which accepts what inet_aton, curl and browsers do ----


def _v4_number(part: str) -> int | None:
    """One dotted part in C ``strtoul(.., 0)`` style: 0x hex, leading-0 octal, else decimal."""
    if not part:
        return None
    if part.startswith("0x"):
        digits, base, valid = part[2:], 16, _HEX_RE
    elif len(part) > 1 and part[0] == "0":
        digits, base, valid = part[1:], 8, _OCT_RE
    else:
        digits, base, valid = part, 10, _DEC_RE
    if not valid.fullmatch(digits):  # int() alone would accept "1_0", "+1" and spaces
        return None
    return int(digits, base) if digits else 0


def _ends_in_number(last: str) -> bool:
    return bool(last) and ((last.isascii() and last.isdigit()) or _v4_number(last) is not None)


def _ipv4(parts: list[str]) -> IPv4Address:
    if len(parts) > 4:
        raise InvalidHost(f"numeric host with {len(parts)} parts is not an IPv4 address")
    numbers: list[int] = []
    for part in parts:
        n = _v4_number(part)
        if n is None:
            raise InvalidHost(f"numeric host part {part!r} is not an IPv4 number")
        numbers.append(n)
    if any(n > 255 for n in numbers[:-1]):
        raise InvalidHost("IPv4 part out of range (> 255)")
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        raise InvalidHost("IPv4 address out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def _ipv6(text: str) -> IPv4Address | IPv6Address:
    if "%" in text:
        raise InvalidHost("IPv6 zone ids ('%') are not allowed")
    if not text:
        raise InvalidHost("empty IPv6 literal")
    try:
        addr = IPv6Address(text)
    except ValueError as err:
        raise InvalidHost(f"invalid IPv6 literal: {err}") from None
    mapped = addr.ipv4_mapped
    return mapped if mapped is not None else addr


# --- authority -------------------------------------------------------------------------------------


def split_authority(
    authority: str, default_port: int, *, bare_ipv6: bool = True
) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or (with ``bare_ipv6``) a bare IPv6 address.

    Returns the host part verbatim (brackets kept, not canonicalised: pass it to canonical_host) and
    the port. Userinfo and anything but 1..65535 in ASCII digits are refused, never ignored. URLs and
    Host headers never carry a bare IPv6 address (``http://2001::1/`` is not ``[2001::1]:80``), so they
    are parsed with ``bare_ipv6=False``; only a command line's ``HOST[:PORT]`` may use that form.
    """
    if not authority:
        raise InvalidHost("empty authority")
    if "@" in authority:
        raise InvalidHost("authority contains '@' (userinfo is not allowed)")
    if authority[0] == "[":
        end = authority.find("]")
        if end < 0:
            raise InvalidHost("'[' without closing ']'")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if not rest:
            return host, default_port
        if rest[0] != ":":
            raise InvalidHost(f"unexpected text after ']': {rest!r}")
        return host, _port(rest[1:])
    colons = authority.count(":")
    if colons == 0:
        return authority, default_port
    if colons > 1:
        if not bare_ipv6:
            raise InvalidHost("an IPv6 address here must be in brackets: [v6] or [v6]:port")
        return authority, default_port  # bare IPv6 without brackets cannot carry a port
    host, _, port = authority.partition(":")
    if not host:
        raise InvalidHost("empty host")
    return host, _port(port)


def parse_endpoint(
    spec: str,
    *,
    default_host: str | None = None,
    default_port: int | None = None,
    any_port: bool = False,
) -> tuple[str, int]:
    """A listening or server address from configuration: ``HOST:PORT``, ``[v6]:PORT``, ``v6``, ``:PORT``
    (with ``default_host``) or ``HOST`` (with ``default_port``) -> (host without brackets, port).

    ``any_port`` also accepts port 0 (a listener on an ephemeral port). Raises InvalidHost (a
    ValueError) naming the problem."""
    text = spec.strip()
    if text.startswith(":") and text.count(":") == 1:
        if default_host is None:
            raise InvalidHost(f"{spec!r}: a host is required")
        text = (f"[{default_host}]" if ":" in default_host else default_host) + text
    if any_port and (text.endswith(":0") and not text.endswith("::0")):
        host, _ = split_authority(text[:-2], 0)
        port = 0
    else:
        sentinel = -1
        host, port = split_authority(text, sentinel)
        if port == sentinel:
            if default_port is None:
                raise InvalidHost(f"{spec!r}: expected HOST:PORT")
            port = default_port
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host, port


def _port(text: str) -> int:
    if not text:
        raise InvalidHost("empty port")
    if len(text) > 5 or not (text.isascii() and text.isdigit()):
        raise InvalidHost(f"port {text[:12]!r} is not a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidHost(f"port {port} is not from 1 to 65535")
    return port
