"""Host canonicalisation against the spelling tricks of threats.md classes 1 and 2.

Every valid case asserts the exact canonical value, every invalid case the precise reason, so a
removed or loosened check fails a specific row.
"""

from __future__ import annotations

import re
import socket
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from proxy.core import hosts
from proxy.core.hosts import InvalidHost, canonical_host, parse_endpoint, split_authority
from tests.harness import fresh_python

LOOPBACK = IPv4Address("127.0.0.1")
# Fullwidth look-alikes, escaped so a reader sees what the bytes are.
FW_PYPI = "\uff50\uff59\uff50\uff49.\uff4f\uff52\uff47"  # "pypi.org"
FW_LOOPBACK = "\uff11\uff12\uff17.\uff10.\uff10.\uff11"  # "127.0.0.1"
FW_BAD_IP = "\uff11\uff12\uff17.\uff10.\uff10.\uff19\uff19\uff19"  # "127.0.0.999"
METADATA = IPv4Address("169.254.169.254")

# --- names -----------------------------------------------------------------------------------------

L63 = "a" * 63
L64 = "a" * 64
NAME_253 = f"{L63}.{L63}.{L63}.{'b' * 61}"
NAME_254 = f"{L63}.{L63}.{L63}.{'b' * 62}"
assert len(NAME_253) == 253 and len(NAME_254) == 254


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case and one trailing dot
        ("pypi.org", "pypi.org"),
        ("PyPI.ORG", "pypi.org"),
        ("pypi.org.", "pypi.org"),
        ("PYPI.ORG.", "pypi.org"),
        ("files.pythonhosted.org", "files.pythonhosted.org"),
        # underscore appears in real DNS names; hyphens inside labels (incl. positions 3-4)
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("_acme-challenge.Example.com", "_acme-challenge.example.com"),
        ("r3---sn-4g5e6nze.googlevideo.com", "r3---sn-4g5e6nze.googlevideo.com"),
        ("localhost", "localhost"),
        # digits are fine as long as the last label is not a number
        ("1password.com", "1password.com"),
        ("123.example.com", "123.example.com"),
        ("0x7f.example.com", "0x7f.example.com"),
        ("a.0xg", "a.0xg"),
        # suffix traps stay distinct names (matching handles them; here they must not be mangled)
        ("pypi.org.evil.com", "pypi.org.evil.com"),
        ("evilpypi.org", "evilpypi.org"),
        # length limits: exactly 63 / 253 octets are fine
        (f"{L63}.com", f"{L63}.com"),
        (NAME_253, NAME_253),
        (NAME_253 + ".", NAME_253),
        # IDN -> punycode (IDNA 2008 via UTS #46)
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("bücher.example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("bücher\u3002example", "xn--bcher-kva.example"),  # ideographic full stop is a dot
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("ß.de", "xn--zca.de"),  # IDNA 2008 keeps sharp s; IDNA 2003 would make it "ss.de"
        ("_dmarc.bücher.example", "_dmarc.xn--bcher-kva.example"),
        # fullwidth compatibility forms map to the ASCII name they look like
        (FW_PYPI, "pypi.org"),
        ("\u212a.example", "k.example"),  # KELVIN SIGN folds to k
        # invisible format characters are dropped by UTS #46, as browsers do: same destination
        ("pay\u00adpal.com", "paypal.com"),
        ("pay\u200bpal.com", "paypal.com"),
    ],
)
def test_valid_names(raw: str, expected: str) -> None:
    assert canonical_host(raw) == expected


def test_homoglyph_is_not_the_latin_name() -> None:
    cyrillic = canonical_host("\u0440\u0430\u0443\u0440\u0430l.com")  # Cyrillic "raypa" + Latin l
    assert cyrillic == "xn--l-7sba6dbr.com"
    assert cyrillic != canonical_host("paypal.com")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty host"),
        # control characters and whitespace anywhere (header injection, log forging)
        ("pypi.org\r\nX-Injected: 1", "control or whitespace character U+000D"),
        ("pypi.org\n", "control or whitespace character U+000A"),
        ("pypi.org\x00.evil.com", "control or whitespace character U+0000"),
        ("pypi\t.org", "control or whitespace character U+0009"),
        ("pypi .org", "control or whitespace character U+0020"),
        (" pypi.org", "control or whitespace character U+0020"),
        ("pypi.org\x7f", "control or whitespace character U+007F"),
        ("pypi.org\x0b", "control or whitespace character U+000B"),
        ("pypi.org\u0085", "control or whitespace character U+0085"),
        ("pypi\u00a0.org", "control or whitespace character U+00A0"),
        ("pypi.org\u2028", "control or whitespace character U+2028"),
        ("bücher\u3000.example", "control or whitespace character U+3000"),
        # userinfo
        ("user@pypi.org", "userinfo"),
        ("pypi.org@evil.com", "userinfo"),
        ("user:pass@pypi.org", "userinfo"),
        ("evil.com\uff20pypi.org", "'@' is not allowed"),  # fullwidth @ maps to @
        # percent-encoding
        ("pypi%2eorg", "percent-encoding"),
        # empty labels and dots
        ("a..b", "empty label"),
        (".pypi.org", "empty label"),
        ("pypi.org..", "empty label"),
        (".", "only a dot"),
        ("..", "empty label"),
        ("bücher..example", "empty label"),
        # lengths
        (f"{L64}.com", "label longer than 63 octets"),
        (NAME_254, "longer than 253 octets"),
        (NAME_254 + ".", "longer than 253 octets"),
        ("a" * 300, "longer than 253 octets"),
        ("ü" * 60 + ".de", "Label too long"),
        (".".join(["bücher"] * 20), "longer than 253 octets after punycode"),
        ("bücher." * 200 + "de", "longer than 1024 characters"),
        # characters outside LDH (+ underscore)
        ("py!pi.org", "'!' is not allowed"),
        ("pypi.org/simple", "'/' is not allowed"),
        ("pypi.org?x", "'?' is not allowed"),
        ("pypi.org#x", "'#' is not allowed"),
        ("*.pypi.org", "'*' is not allowed"),
        ('pypi".org', "'\"' is not allowed"),
        ("pypi.org\\evil.com", "'\\\\' is not allowed"),
        ("pypi.org,evil.com", "',' is not allowed"),
        ("-pypi.org", "starts or ends with a hyphen"),
        ("pypi-.org", "starts or ends with a hyphen"),
        # IDNA failures and bogus A-labels that could alias another name
        ("💩.la", "not valid IDNA 2008"),
        ("xn--ls8h.la", "invalid punycode label"),
        ("xn--.com", "invalid punycode label"),
        ("xn--a.com", "invalid punycode label"),
        ("xn--pypi-.org", "invalid punycode label"),
        ("xn---bbk.example", "not the canonical Punycode"),
        ("xn--bcher-kva\u3002xn--.example", "invalid punycode label"),
        ("\u202epypi.org", "not a valid internationalised name"),  # bidi override
        # a name ending in a number is an IPv4 address or nothing (WHATWG URL)
        ("1.2.3.999999", "out of range"),
        ("0x1.0x2.3.4444444444", "out of range"),
        ("pypi.123", "'pypi' is not an IPv4 number"),
        ("example.0x1", "'example' is not an IPv4 number"),
        ("example.0x", "'example' is not an IPv4 number"),
        ("1.2.3.4.5", "5 parts"),
        ("256.0.0.1", "out of range"),
        ("0x100.0.0.1", "out of range"),
        ("4294967296", "out of range"),
        ("0x100000000", "out of range"),
        ("08.0.0.1", "'08' is not an IPv4 number"),
        ("09", "'09' is not an IPv4 number"),
        ("0xg.1", "'0xg' is not an IPv4 number"),
        ("1..1", "'' is not an IPv4 number"),
        ("127.0.0.1..", "empty label"),
        ("1.2.3.4\u0661", "not valid IDNA 2008"),  # ARABIC-INDIC ONE: not an ASCII digit
        (FW_BAD_IP, "out of range"),  # fullwidth digits are judged after mapping
    ],
)
def test_invalid_names(raw: str, reason: str) -> None:
    with pytest.raises(InvalidHost, match=re.escape(reason)):
        canonical_host(raw)


def test_invalid_is_not_cached_as_valid() -> None:
    for _ in range(3):
        with pytest.raises(InvalidHost):
            canonical_host("pypi.org\r\n")


def test_cache_is_bounded() -> None:
    assert hosts._canonical.cache_info().maxsize == 4096


def test_non_string_is_invalid() -> None:
    with pytest.raises(InvalidHost, match="must be a string"):
        canonical_host(b"pypi.org")  # type: ignore[arg-type]


# --- IPv4 literals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0x7F.0.0.1",
        "0x7f.1",
        "0X7F.1",
        "0177.0.0.1",
        "0177.0.0.01",
        "0177.1",
        "017700000001",
        "0x7f.0x0.0x0.0x1",
        "0x7f.0.0x0.01",  # mixed bases per part
        "127.000.000.001",
        "00000000000000177.1",
        "127.0.0.1.",
        "0x7f.1.",
        "2130706433.",
        FW_LOOPBACK,  # fullwidth digits and UTS #46 mapping
        "127\u30020\u30020\u30021",  # ideographic full stops
        "[::ffff:127.0.0.1]",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "[::FFFF:7F00:1]",
        "0:0:0:0:0:ffff:7f00:1",
    ],
)
def test_every_spelling_of_loopback(raw: str) -> None:
    assert canonical_host(raw) == LOOPBACK


@pytest.mark.parametrize(
    "raw",
    [
        "169.254.169.254",
        "2852039166",
        "0xA9FEA9FE",
        "0xa9fea9fe",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",
        "0251.0xfe.169.0376",
        "169.254.43518",
        "169.16689662",
        "0xa9.16689662",
        "025177524776",
        "169.254.169.254.",
        "2852039166.",
        "0xA9FEA9FE.",
        "::ffff:169.254.169.254",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
    ],
)
def test_every_spelling_of_metadata(raw: str) -> None:
    assert canonical_host(raw) == METADATA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.1.1", "10.1.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("0x.0x.0x.0x", "0.0.0.0"),
        ("0xffffffff", "255.255.255.255"),
        ("4294967295", "255.255.255.255"),
        ("1.1.1.1", "1.1.1.1"),
        ("203.0.113.7", "203.0.113.7"),
    ],
)
def test_other_ipv4(raw: str, expected: str) -> None:
    assert canonical_host(raw) == IPv4Address(expected)


@pytest.mark.parametrize(
    "raw",
    [
        "127.1",
        "0x7f.1",
        "2130706433",
        "0177.0.0.1",
        "0x7f.0.0x0.01",
        "127.000.000.001",
        "2852039166",
        "0251.0xfe.169.0376",
        "169.16689662",
        "10.1.1",
    ],
)
def test_ipv4_agrees_with_inet_aton(raw: str) -> None:
    """The C library's reading is what a resolver-less client connects to; ours must match."""
    assert canonical_host(raw) == IPv4Address(socket.inet_aton(raw))


# --- IPv6 literals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("::", "::"),
        ("[::]", "::"),
        ("fe80::1", "fe80::1"),
        ("[FE80::1]", "fe80::1"),
        ("fd00:ec2::254", "fd00:ec2::254"),
        ("[fd00:ec2::254]", "fd00:ec2::254"),
        # embedding forms stay IPv6 here; addresses.py judges the IPv4 inside
        ("64:ff9b::7f00:1", "64:ff9b::7f00:1"),
        ("[64:ff9b::169.254.169.254]", "64:ff9b::a9fe:a9fe"),
        ("2002:7f00:1::", "2002:7f00:1::"),
        ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "2001:0:4136:e378:8000:63bf:80ff:fffe"),
        ("::127.0.0.1", "::7f00:1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_ipv6(raw: str, expected: str) -> None:
    result = canonical_host(raw)
    assert isinstance(result, IPv6Address)
    assert result == IPv6Address(expected)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("fe80::1%eth0", "zone ids"),
        ("[fe80::1%25eth0]", "zone ids"),
        ("[fe80::1%eth0]", "zone ids"),
        ("[::1", "without closing"),
        ("[::1]x", "after ']'"),
        ("[::1]:443", "after ']'"),
        ("[]", "empty IPv6 literal"),
        ("[evil.com]", "invalid IPv6 literal"),
        ("[127.0.0.1]", "invalid IPv6 literal"),
        (":::", "invalid IPv6 literal"),
        ("1:2:3:4:5:6:7:8:9", "invalid IPv6 literal"),
        ("::ffff:0127.0.0.1", "invalid IPv6 literal"),  # leading-zero octal inside IPv6
        ("::ffff:127.1", "invalid IPv6 literal"),
        ("pypi.org:443", "invalid IPv6 literal"),  # a port is not part of a host
        ("[::1]\r\n", "control or whitespace"),
        ("[::1\u3000]", "control or whitespace"),
    ],
)
def test_invalid_ipv6(raw: str, reason: str) -> None:
    with pytest.raises(InvalidHost, match=re.escape(reason)):
        canonical_host(raw)


# --- idempotence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["PyPI.org.", "bücher.example", "0x7f.1", "[::ffff:7f00:1]", "[64:ff9b::1]", FW_PYPI],
)
def test_canonical_is_a_fixed_point(raw: str) -> None:
    once = canonical_host(raw)
    assert canonical_host(str(once)) == once


# --- split_authority ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("pypi.org", ("pypi.org", 443)),
        ("pypi.org:443", ("pypi.org", 443)),
        ("pypi.org:8443", ("pypi.org", 8443)),
        ("PyPI.org.:80", ("PyPI.org.", 80)),  # raw host: canonicalisation is a separate step
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("h:65535", ("h", 65535)),
        ("h:00080", ("h", 80)),
        ("[::1]", ("[::1]", 443)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[::ffff:127.0.0.1]:22", ("[::ffff:127.0.0.1]", 22)),
        ("::1", ("::1", 443)),
        ("2001:db8::1", ("2001:db8::1", 443)),
        ("bücher.example:8080", ("bücher.example", 8080)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int]) -> None:
    assert split_authority(authority, 443) == expected


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        ("", "empty authority"),
        (":443", "empty host"),
        ("user@pypi.org:443", "userinfo"),
        ("user:pw@pypi.org", "userinfo"),
        ("pypi.org:", "empty port"),
        ("pypi.org:0", "port 0 is not from 1 to 65535"),
        ("pypi.org:65536", "port 65536 is not from 1 to 65535"),
        ("pypi.org:99999", "not from 1 to 65535"),
        ("pypi.org:123456", "not a number"),
        ("pypi.org:http", "not a number"),
        ("pypi.org:+443", "not a number"),
        ("pypi.org:-1", "not a number"),
        ("pypi.org:1_0", "not a number"),
        ("pypi.org: 443", "not a number"),
        ("pypi.org:443\r\n", "not a number"),
        ("pypi.org:\u0664\u0664\u0663", "not a number"),  # Arabic-Indic 443
        ("pypi.org:\u00b2", "not a number"),  # superscript two passes str.isdigit()
        ("[::1", "without closing"),
        ("[::1]x", "after ']'"),
        ("[::1]:", "empty port"),
        ("[::1]:0", "not from 1 to 65535"),
        ("[::1]:65536", "not from 1 to 65535"),
    ],
)
def test_split_authority_invalid(authority: str, reason: str) -> None:
    with pytest.raises(InvalidHost, match=re.escape(reason)):
        split_authority(authority, 443)


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("[::ffff:127.0.0.1]:443", LOOPBACK, 443),
        ("0x7f.1:8080", LOOPBACK, 8080),
        ("2852039166:80", METADATA, 80),
        ("PyPI.org.:443", "pypi.org", 443),
        ("[fe80::1]:443", IPv6Address("fe80::1"), 443),
    ],
)
def test_split_then_canonical(authority: str, host: object, port: int) -> None:
    raw, got_port = split_authority(authority, 443)
    assert (canonical_host(raw), got_port) == (host, port)


def test_bracketed_name_is_not_unwrapped() -> None:
    """'[evil.com]:443' is malformed; it must not turn into the name evil.com."""
    raw, _ = split_authority("[evil.com]:443", 443)
    with pytest.raises(InvalidHost, match="invalid IPv6 literal"):
        canonical_host(raw)


# --- parse_endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected"),
    [
        ("127.0.0.1:3128", {}, ("127.0.0.1", 3128)),
        ("[::1]:53", {}, ("::1", 53)),
        (":9464", {"default_host": "127.0.0.1"}, ("127.0.0.1", 9464)),
        (":53", {"default_host": "::1"}, ("::1", 53)),
        ("8.8.8.8", {"default_port": 53}, ("8.8.8.8", 53)),
        ("2001:db8::53", {"default_port": 53}, ("2001:db8::53", 53)),
        ("0.0.0.0:0", {"any_port": True}, ("0.0.0.0", 0)),
        ("[::]:0", {"any_port": True}, ("::", 0)),
        ("gate.internal:3128", {}, ("gate.internal", 3128)),
    ],
)
def test_parse_endpoint(spec: str, kwargs: dict[str, object], expected: tuple[str, int]) -> None:
    assert parse_endpoint(spec, **kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "kwargs", "reason"),
    [
        ("127.0.0.1:0", {}, "not from 1 to 65535"),
        ("127.0.0.1", {}, "expected HOST:PORT"),
        (":53", {}, "a host is required"),
        ("h:x", {}, "not a number"),
        ("u@h:1", {}, "userinfo"),
        ("[::1:53", {}, "without closing"),
    ],
)
def test_parse_endpoint_invalid(spec: str, kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidHost, match=re.escape(reason)):
        parse_endpoint(spec, **kwargs)  # type: ignore[arg-type]


def test_urls_never_carry_a_bare_ipv6_address() -> None:
    with pytest.raises(InvalidHost, match="brackets"):
        split_authority("2001::1", 80, bare_ipv6=False)
    assert split_authority("[2001::1]", 80, bare_ipv6=False) == ("[2001::1]", 80)


# --- idna, loaded by the first name that needs it ---------------------------------------------------

_ROOT = str(Path(__file__).resolve().parents[3])


def test_ascii_names_never_load_idna_and_unicode_names_do() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from proxy.core.hosts import canonical_host\n"
        "print(canonical_host('PyPI.org.'), 'idna' in sys.modules)\n"
        "print(canonical_host('b\\u00fccher.example'), 'idna' in sys.modules)\n"
    )
    assert fresh_python(code, _ROOT).split() == [
        "pypi.org", "False", "xn--bcher-kva.example", "True"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("blocked", "names"),
    [
        # idna itself: every name only it can check
        ("idna", ("b\u00fccher.example", "xn--bcher-kva.example", "xn--zz.example")),
        # only the UTS #46 tables, which idna imports on first use: a damaged install fails there
        ("idna.uts46data", ("b\u00fccher.example",)),
    ],
)
def test_a_name_idna_cannot_check_is_refused(blocked: str, names: tuple[str, ...]) -> None:
    """Fail closed: a name only IDNA can check is invalid when idna (or its tables) cannot be
    imported, never passed through unchecked and never an ImportError out of the decision."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.modules[sys.argv[2]] = None\n"
        "from proxy.core.hosts import InvalidHost, canonical_host\n"
        "print(canonical_host('pypi.org'))\n"
        "for name in sys.argv[3:]:\n"
        "    try:\n"
        "        print('allowed', canonical_host(name))\n"
        "    except InvalidHost as exc:\n"
        "        print('refused', 'cannot be checked' in str(exc))\n"
    )
    assert fresh_python(code, _ROOT, blocked, *names).split() == [
        "pypi.org", *["refused", "True"] * len(names)
    ]  # fmt: skip
