"""Credentials the sandbox never holds: placeholders, where they may travel, and the swap.

The sandbox gets a *placeholder* for each declared credential: random, issued to one sandbox, shaped
like the real token (same prefix, length and alphabet) so that tools which check a token's shape keep
working. The gate finds placeholders in every request it can read and decides, in one place
(:func:`judge`):

- a placeholder for a credential bound to this host and port, found only where its declaration says
  it is sent (a header, HTTP Basic credentials, a query parameter), on a request inside an inspected
  TLS tunnel that matches the credential's request rules, issued to this sandbox: a *use* - the
  adapter replaces it with the real value on the way out;
- anywhere else - another host, plain HTTP, another header, the URL or the body, another sandbox's
  placeholder, a method or path the credential is not for - ``credential-misuse``: refused, nothing
  sent upstream.

The real value only ever travels in the declared place of a request to a bound host: never into a
body or URL a service might store and show back (a gist, an issue comment), and a response from a
bound host is scrubbed back to the placeholder by :class:`Scrubber`. A placeholder that leaks through
a channel the gate cannot read (a raw TLS tunnel, a streamed body, a split or re-encoded copy) reveals
nothing: only this gate, for this sandbox, turns it into the secret.

Pure: no sources, no I/O. Real values reach this module only as arguments of the swap helpers and the
scrubber, and never become part of a decision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, unquote_to_bytes

from proxy.core.authority import join_authority
from proxy.core.decision import Kind
from proxy.core.fieldlines import websocket_field
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.httpheads import http_head
from proxy.core.paths import PathGlob, Unreadable, parse_target
from proxy.core.requests import judged_methods

# Token formats whose shape tools check (longest prefix first). A real value starting with one of
# these gets a placeholder with that prefix; anything else gets GENERIC_PREFIX.
KNOWN_PREFIXES = (
    "github_pat_",
    "sk-proj-",
    "sk-ant-",
    "dop_v1_",
    "shpat_",
    "glpat-",
    "gldt-",
    "pypi-",
    "xoxb-",
    "xoxp-",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "npm_",
    "hf_",
    "sk-",
)
GENERIC_PREFIX = "egress-ph-"
MIN_RANDOM = 20  # random characters in a placeholder, at least (>= 119 bits in base62)
_ALNUM = string.ascii_letters + string.digits


def placeholder_for(real: str, seed: bytes | None = None) -> str:
    """A placeholder shaped like ``real``: its known prefix (or :data:`GENERIC_PREFIX`), the same
    length when that leaves :data:`MIN_RANDOM` random characters (longer otherwise), and the
    alphabet of its random part (letters and digits, plus ``_`` and ``-`` when it has them).

    Random (``secrets``) unless a ``seed`` is given: a shared gate's replicas derive the same
    placeholder from a keyed seed (an HMAC the sandbox cannot compute), so none has to store it."""
    prefix = next((p for p in KNOWN_PREFIXES if real.startswith(p)), GENERIC_PREFIX)
    body = real[len(prefix) :] if prefix != GENERIC_PREFIX else real
    alphabet = _ALNUM + "".join(c for c in "_-" if c in body)
    count = max(len(real) - len(prefix), MIN_RANDOM)
    if seed is None:
        return prefix + "".join(secrets.choice(alphabet) for _ in range(count))
    stream = hashlib.shake_256(seed).digest(4 * count)
    picks = (int.from_bytes(stream[4 * i : 4 * i + 4], "big") % len(alphabet) for i in range(count))
    return prefix + "".join(alphabet[i] for i in picks)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a credential is sent (and so where its placeholder may appear): a header, HTTP Basic
    credentials in ``Authorization``, a query parameter."""

    header: str | None = None  # lower case
    formats: tuple[str, ...] = ()  # accepted shapes of that header's value, "{}" = the token
    basic: bool = False
    basic_username: str | None = None  # what git's credential helper sends as the user name
    query: str | None = None

    def carriers(self) -> frozenset[str]:
        out: set[str] = set()
        if self.header is not None:
            out.add(f"header:{self.header}")
        if self.basic:
            out.add("basic:authorization")
        if self.query is not None:
            out.add(f"query:{self.query.lower()}")
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class Binding:
    """One declared credential as the gate enforces it (its value lives elsewhere)."""

    name: str
    hosts: frozenset[tuple[str, int]]  # canonical host names and ports
    delivery: Delivery
    methods: frozenset[str] | None = None  # upper case; None: every method
    paths: tuple[PathGlob, ...] | None = None  # None: every path
    file: str = ""
    line: int = 0

    def hosts_text(self) -> str:
        return ", ".join(join_authority(h, p) for h, p in sorted(self.hosts))


@dataclass(frozen=True, slots=True)
class Carried:
    """What a request carries that a placeholder could hide in, as the adapter read it (untrusted):
    every header field, the request target (origin form) and the body when it was held."""

    headers: tuple[tuple[str, str], ...] = ()
    target: str = "/"
    body: bytes | None = None
    authority: str = ""  # the host the request names (a CONNECT's too): never a carrier


@dataclass(frozen=True, slots=True)
class Found:
    placeholder: str
    where: str  # "header:NAME", "basic:NAME", "query:NAME", "url" or "body"


@dataclass(frozen=True, slots=True)
class Judged:
    """The credential step's answer for one request that carried placeholders."""

    names: tuple[str, ...]  # the credentials involved, in declaration order
    misuse: bool
    detail: str
    swaps: tuple[tuple[str, str], ...] = ()  # (credential, placeholder) to swap on a use

    @property
    def label(self) -> str:
        return ",".join(self.names)


@dataclass
class Credentials:
    """The declared bindings and the placeholders issued for them, per sandbox."""

    bindings: Mapping[str, Binding]
    # placeholder -> (credential name, sandbox id it was issued to; None: any client of this gate)
    issued: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)
    _folded: tuple[re.Pattern[str], dict[str, str]] | None = field(default=None, repr=False)

    def issue(self, name: str, sandbox_id: str | None, placeholder: str) -> None:
        if name not in self.bindings:
            raise KeyError(name)
        self.issued[placeholder] = (name, sandbox_id)
        self._pattern = self._folded = None

    def placeholder(self, name: str, sandbox_id: str | None) -> str | None:
        for value, (issued_name, sandbox) in self.issued.items():
            if issued_name == name and sandbox == sandbox_id:
                return value
        return None

    def bound_to(
        self, host: str, sandbox_id: str | None, *, port: int | None = None
    ) -> tuple[str, ...]:
        """Names of the credentials issued to ``sandbox_id`` that may go to ``host:port``, or with
        no ``port``, that are bound to ``host`` on any port: the responses whose scrubbing they
        call for (a service that kept a header sent to one of its ports can show it on another,
        its plain-HTTP port or a second TLS port, as well)."""
        issued = {name for name, sandbox in self.issued.values() if sandbox == sandbox_id}
        try:
            canonical = canonical_host(host)
        except InvalidHost:
            return ()
        host = canonical if isinstance(canonical, str) else str(canonical)
        return tuple(
            name
            for name, binding in self.bindings.items()
            if name in issued
            and (
                any(bound == host for bound, _ in binding.hosts)
                if port is None
                else (host, port) in binding.hosts
            )
        )

    # -- finding placeholders ---------------------------------------------------------------

    def _text_pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None and self.issued:
            ordered = sorted(self.issued, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(p) for p in ordered))
        return self._pattern

    def _folded_pattern(self) -> tuple[re.Pattern[str], dict[str, str]]:
        if self._folded is None:
            pattern = self._text_pattern()
            assert pattern is not None
            lowered = {p.lower(): p for p in self.issued}
            self._folded = (re.compile(pattern.pattern, re.IGNORECASE), lowered)
        return self._folded

    def scan(self, carried: Carried) -> list[Found]:
        """Every placeholder in the request: header values (and the decoded credentials of a
        ``Basic`` header), the target (raw and percent-decoded, and per query parameter), the held
        body (raw and percent-decoded)."""
        pattern = self._text_pattern()
        if pattern is None:
            return []
        found: list[Found] = []
        for name, value in carried.headers:
            key = name.lower()
            for match in pattern.findall(value):
                found.append(Found(match, f"header:{key}"))
            decoded = _basic_credentials(value)
            if decoded is not None:
                found += [Found(m, f"basic:{key}") for m in pattern.findall(decoded)]
        found += _scan_target(pattern, carried.target)
        if carried.authority:  # host names are case-insensitive (and canonically lower case)
            folded, lowered = self._folded_pattern()
            for hit in folded.findall(carried.authority):
                found.append(Found(lowered.get(hit.lower(), hit), "url"))
        if carried.body:
            found += self._scan_body(carried.body)
        return found

    def _scan_body(self, body: bytes) -> list[Found]:
        """One substring search per placeholder (C speed on a held body, unlike an alternation),
        on the body and on its percent-decoded form."""
        texts = [body]
        decoded = _percent_decoded(body)
        if decoded is not body:
            texts.append(decoded)
        return [
            Found(placeholder, "body")
            for placeholder in sorted(self.issued)
            if any(placeholder.encode() in text for text in texts)
        ]


def _scan_target(pattern: re.Pattern[str], target: str) -> list[Found]:
    if not pattern.search(_decoded_text(target)):
        return []
    path, _, query = target.partition("?")
    found: list[Found] = []
    outside = [_decoded_text(path)]
    for part in query.replace(";", "&").split("&") if query else ():
        name, eq, value = part.partition("=")
        hits = pattern.findall(_decoded_text(value)) if eq else []
        key = _decoded_text(name).lower()
        found += [Found(hit, f"query:{key}") for hit in hits]
        outside.append(_decoded_text(name))
    for text in outside:
        found += [Found(hit, "url") for hit in pattern.findall(text)]
    return found


def _decoded_text(text: str) -> str:
    """Percent-decoded until it stops changing (bounded), so ``%2567hp_`` is found as well."""
    for _ in range(3):
        decoded = unquote_to_bytes(text.replace("+", " ")).decode("latin-1")
        if decoded == text:
            break
        text = decoded
    return text


def _percent_decoded(body: bytes) -> bytes:
    return unquote_to_bytes(body.replace(b"+", b" ")) if b"%" in body else body


def _basic_credentials(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "basic" or not rest.strip():
        return None
    try:
        return base64.b64decode(rest.strip() + "==", validate=False).decode("latin-1")
    except (binascii.Error, ValueError):
        return None


def asks_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a request's fields ask for a protocol upgrade: what comes over one is not read, so
    no credential goes on one, nor to a host a credential is bound to. WebSocket handshake fields
    ask for one without ``Upgrade`` too: mitmproxy switches on them (the request step judges them
    so as well)."""
    return any(
        name.lower() == "upgrade" or websocket_field(name.encode("latin-1", "replace"))
        for name, _ in headers
    )


def judge(
    credentials: Credentials,
    found: Sequence[Found],
    *,
    kind: Kind,
    host: str,
    port: int | None,
    method: str | None,
    target: str,
    sandbox_id: str | None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Judged | None:
    """A use (every placeholder where its credential may go) or a misuse (the first problem
    found), or None when the request carries no placeholder. ``body``: the held body, when it was
    read (a form's ``_method`` field is one of the methods the request is judged as)."""
    if not found:
        return None
    headers = tuple(headers)
    acts_as = _acts_as(method, target, headers, body)
    names: list[str] = []
    for each in found:
        name, _ = credentials.issued[each.placeholder]
        if name not in names:
            names.append(name)
    names.sort(key=list(credentials.bindings).index)

    def misuse(detail: str) -> Judged:
        return Judged(tuple(names), True, detail)

    values = {name.lower(): value for name, value in headers}
    if asks_upgrade(values.items()):
        return misuse(
            f"credential '{names[0]}' is never sent on a protocol upgrade (WebSocket messages "
            "are not read, so an echo could not be scrubbed)"
        )
    swaps: list[tuple[str, str]] = []
    for each in found:
        name, issued_to = credentials.issued[each.placeholder]
        binding = credentials.bindings[name]
        where = join_authority(host, port or 443)
        if issued_to != sandbox_id:
            return misuse(f"the placeholder for credential '{name}' was issued to another sandbox")
        if (host, port or 443) not in binding.hosts:
            return misuse(
                f"credential '{name}' is bound to {binding.hosts_text()}, not {where}; "
                "its placeholder was not sent"
            )
        if kind is not Kind.REQUEST:
            return misuse(
                f"credential '{name}' is only sent inside an inspected TLS connection, never "
                "over plain HTTP"
            )
        if each.where not in binding.delivery.carriers():
            return misuse(
                f"credential '{name}' was found in {_carrier_text(each.where)}, where it is "
                f"never sent (it goes in {_delivery_text(binding.delivery)})"
            )
        formats = binding.delivery.formats
        if formats and each.where.startswith("header:"):
            # Every field of that name that carries the placeholder (a header may be given more
            # than once, and the swap reaches each one), not only the last.
            key = each.where[len("header:") :]
            carrying = [v for n, v in headers if n.lower() == key and each.placeholder in v]
            shapes = {f.replace("{}", each.placeholder) for f in formats}
            if not carrying or any(value not in shapes for value in carrying):
                return misuse(
                    f"credential '{name}' must be sent as "
                    + " or ".join(repr(f"{binding.delivery.header}: {f}") for f in formats)
                )
        problem = _request_problem(binding, method, target, acts_as)
        if problem is not None:
            return misuse(f"credential '{name}' {problem}")
        if (name, each.placeholder) not in swaps:
            swaps.append((name, each.placeholder))
    return Judged(tuple(names), False, f"credential(s) {', '.join(names)} added", tuple(swaps))


def _acts_as(
    method: str | None, target: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> tuple[str, ...]:
    """Every method a server may act on for this request: its own, then each override it carries
    (a method-override header, a ``_method`` query parameter, a held form's ``_method`` field), as
    the request step judges them. A credential's ``methods`` hold for all of them: a POST that a
    server runs as a DELETE is a DELETE made with the credential."""
    fields = [(n.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for n, v in headers]
    head = http_head(method or "", target, fields)
    if body is not None:
        head = head.with_body(body)
    return judged_methods(head)


def _request_problem(
    binding: Binding, method: str | None, target: str, acts_as: Sequence[str] = ()
) -> str | None:
    if binding.methods is not None:
        allowed = ", ".join(sorted(binding.methods))
        if (method or "").upper() not in binding.methods:
            return f"is only sent with {allowed}, not {method}"
        for each in acts_as:
            if each.upper() not in binding.methods:
                return f"is only sent with {allowed}, not {each.upper()} (sent as {method})"
    if binding.paths is not None:
        try:
            path = parse_target(target).path
        except Unreadable:
            path = None
        if path is None:
            return "is only sent to paths it declares, and this path has no canonical form"
        if not any(glob.matches(path) for glob in binding.paths):
            return (
                "is not sent to this path (it declares "
                + ", ".join(str(g) for g in binding.paths)
                + ")"
            )
    return None


def _carrier_text(where: str) -> str:
    kind, _, name = where.partition(":")
    return {
        "header": f"the {name} header",
        "basic": f"the Basic credentials of the {name} header",
        "query": f"the query parameter {name}",
        "url": "the URL",
        "body": "the request body",
    }.get(kind, where)


def _delivery_text(delivery: Delivery) -> str:
    return " or ".join(_carrier_text(carrier) for carrier in sorted(delivery.carriers()))


class Vault(Protocol):
    """Where the adapter gets real values (:class:`proxy.credentials.store.CredentialStore`)."""

    def credentials(self) -> Credentials: ...

    def value(self, name: str) -> str: ...

    def scrub_pairs(self, sandbox_id: str | None) -> list[tuple[str, str]]: ...


# -- the swap (the adapter calls these with the real value) --------------------------------------


def swap_header(value: str, where: str, placeholder: str, real: str) -> str:
    """The header value with the placeholder replaced: in the value itself (``header:``) or inside
    its Basic credentials (``basic:``), re-encoded."""
    if where.startswith("basic:"):
        decoded = _basic_credentials(value)
        if decoded is None or placeholder not in decoded:
            return value
        joined = decoded.replace(placeholder, real).encode("latin-1")
        return "Basic " + base64.b64encode(joined).decode("ascii")
    return value.replace(placeholder, real)


def swap_query(target: str, name: str, placeholder: str, real: str) -> str:
    """The target with the placeholder replaced in the values of query parameter ``name`` only
    (percent-encoded as it must be)."""
    from urllib.parse import quote

    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if eq and _decoded_text(key).lower() == name.lower():
            value = quote(_decoded_text(value).replace(placeholder, real), safe="")
        parts.append(f"{key}{eq}{value}")
    return f"{path}?{'&'.join(parts)}"


def encoded_echoes(real: str, placeholder: str) -> list[tuple[str, str]]:
    """(encoded real value, the placeholder encoded alike) for the encodings the swap itself puts a
    real value in, which an echo hands back as they are: Basic credentials' base64 (standard and
    URL-safe, at each of the three offsets a user name can put the value at) and a query
    parameter's percent-encoding. In base64, only the characters made of the value's bits alone
    are replaced (a user name shares the first and last with it): at most a few bits of its first
    and last character remain, never the value. The replacement has the same length, so an echo
    keeps its shape."""
    out: list[tuple[str, str]] = []
    quoted = quote(real, safe="")
    if quoted != real:
        out.append((quoted, quote(placeholder, safe="")))
    raw, fake = real.encode("latin-1", "replace"), placeholder.encode("latin-1", "replace")
    for offset in range(3):
        core = _base64_core(raw, offset)
        if not core:
            continue
        stand_in = (_base64_core(fake, offset) + "A" * len(core))[: len(core)]
        out.append((core, stand_in))
        urlsafe = core.translate(_URLSAFE)
        if urlsafe != core:
            out.append((urlsafe, stand_in.translate(_URLSAFE)))
    return out


_URLSAFE = str.maketrans("+/", "-_")


def _base64_core(data: bytes, offset: int) -> str:
    """The base64 characters of ``data`` encoded ``offset`` bytes into a longer string that are
    made of ``data``'s bits only: the same whatever comes before and after it."""
    encoded = base64.b64encode(b"\0" * offset + data + b"\0\0").decode("ascii")
    first = -(-8 * offset // 6)  # the first character whose 6 bits all lie in data
    end = 8 * (offset + len(data)) // 6
    return encoded[first:end]


class Scrubber:
    """Replaces real values by their placeholders in a response body fed in chunks, however the
    chunks split a value: it holds back the last ``longest - 1`` bytes until more arrive (or
    :meth:`finish`). A callable, so it can be mitmproxy's ``response.stream``."""

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        self.pairs = sorted(((r, p) for r, p in pairs if r), key=lambda rp: -len(rp[0]))
        self.keep = max((len(r) for r, _ in self.pairs), default=1) - 1
        self._tail = b""
        self.replaced = 0

    def scrub(self, data: bytes) -> bytes:
        for real, placeholder in self.pairs:
            if real in data:
                self.replaced += data.count(real)
                data = data.replace(real, placeholder)
        return data

    def feed(self, chunk: bytes) -> bytes:
        data = self.scrub(self._tail + chunk)
        if self.keep <= 0:
            self._tail = b""
            return data
        # Hold back what could be the start of a value split across chunks.
        cut = max(len(data) - self.keep, 0)
        self._tail = data[cut:]
        return data[:cut]

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        return self.scrub(tail)

    def __call__(self, chunk: bytes) -> bytes:
        return self.feed(chunk) if chunk else self.finish()


def scrub_text(text: str, pairs: Iterable[tuple[str, str]], *, fold_case: bool = False) -> str:
    """``text`` with every real value replaced by its placeholder (headers, messages).
    ``fold_case``: in any case too (a header field's name, which HTTP/2 lower-cases)."""
    for real, placeholder in sorted(pairs, key=lambda rp: -len(rp[0])):
        if not real:
            continue
        if fold_case:
            literal = placeholder.replace("\\", "\\\\")  # a replacement, not a template
            text = re.sub(re.escape(real), literal, text, flags=re.IGNORECASE)
        else:
            text = text.replace(real, placeholder)
    return text


__all__ = [
    "GENERIC_PREFIX",
    "KNOWN_PREFIXES",
    "Binding",
    "Carried",
    "Credentials",
    "Delivery",
    "Found",
    "Judged",
    "Scrubber",
    "Vault",
    "asks_upgrade",
    "encoded_echoes",
    "judge",
    "placeholder_for",
    "scrub_text",
    "swap_header",
    "swap_query",
]
