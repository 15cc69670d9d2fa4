"""Body conditions: what a held request body says, read by real parsers and never by pattern.

A body is judged only when a rule needs it (GraphQL operations, a JSON field such as Git LFS's batch
``operation``, an HTML form's ``_method``). Whatever a parser cannot read unambiguously - invalid JSON,
a key given twice (parsers disagree on which copy wins), two keys differing only in case (Go's
decoder takes them for one), a GraphQL document that does not parse - answers None: an allow rule
then does not match and a deny rule does.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus

from proxy.core.paths import php_name

MAX_GRAPHQL_TOKENS = 10_000
MAX_FORM_PARTS = 1024  # parts of a multipart body read for a method override (more: unreadable)
MAX_PART_HEAD = 8192  # bytes of one part's head (a form's are a line or two)
MAX_JSON_DEPTH = 64


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def forget_documents() -> None:
    """Let go of the last body's document (its judgement is made): a 1 MiB document is tens of MiB
    of objects, which nothing else needs once its request is decided."""
    _json_document.cache_clear()
    _graphql_operations.cache_clear()


def json_document(body: bytes) -> Any | None:
    """The parsed JSON document, or None when it is not JSON a server would read the same way.
    Kept for the last body: a held body is judged by every rule, for every method the request may
    be read as (its overrides), all at once, and its document is not read again each time (one
    only: a 1 MiB document is tens of MiB of objects). Callers read it, never change it."""
    return _json_document(bytes(body))  # (the same object when it is bytes already)


@functools.lru_cache(maxsize=1)
def _json_document(body: bytes) -> Any | None:
    if body.count(b"[") + body.count(b"{") > 100_000:
        return None
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError and _Duplicate
        return None
    if _folded_duplicates(value):
        return None
    return value if _depth(value) <= MAX_JSON_DEPTH else None


def _folded_duplicates(value: Any) -> bool:
    """Whether the top-level object (or one in a top-level batch), whose keys the rules read, has
    two keys that differ only in case: Go's encoding/json (Gitea's LFS, gqlgen) matches keys to a
    struct's fields case-insensitively, and the last one wins - not the copy read here. Case is
    folded both as Unicode does (:meth:`str.casefold`) and as Go does (:func:`_go_fold`)."""
    for each in value if isinstance(value, list) else [value]:
        if isinstance(each, dict) and (
            len({key.casefold() for key in each}) != len(each)
            or len({_go_fold(key) for key in each}) != len(each)
        ):
            return True
    return False


def _go_fold(key: str) -> str:
    """A key as Go's encoding/json folds it to find a struct field: each letter
    ``ToUpper(ToLower(r))`` with single-character mappings. That takes U+0130 (capital I with dot
    above, lower case ``i``) and U+0131 (dotless small i, upper case ``I``) for ``i``, so
    ``operat\u0130on`` is the field ``operation`` there, where :meth:`str.casefold` keeps both
    apart. A mapping Python spells with several characters is cut to its first (U+0130 lowers to
    ``i`` and a combining dot): where that folds more than Go does, a body is only refused more
    often."""
    if key.isascii():
        return key.upper()
    return "".join(ch.lower()[:1].upper()[:1] or ch for ch in key)


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def json_field(body: bytes, key: str) -> str | None:
    """The string value of a top-level ``key`` of a JSON object body (None: absent or unreadable)."""
    document = json_document(body)
    if not isinstance(document, dict):
        return None
    value = document.get(key)
    return value if isinstance(value, str) else None


def graphql_operations(body: bytes, url_documents: Iterable[str] = ()) -> frozenset[str] | None:
    """Every operation type (query, mutation, subscription) the JSON request body asks for.

    A body may be one request object or a batch (a list of them); each must carry its document in
    ``query``. A request without one (a persisted-query hash) could run anything: None.
    ``url_documents``: the values of the URL's ``query`` parameter, which express-graphql and the
    servers modelled on it run *instead of* the body's document: each is judged as well.

    A ``_json`` key in a request object is a batch too: Rails puts a JSON object's keys into
    ``params`` as they are, and controllers that run a batch from ``params[:_json]`` (GitLab's)
    run that list instead of ``query``. Each of its requests is judged; anything else there is
    unreadable.

    Kept for the last request (as :func:`json_document` is)."""
    return _graphql_operations(bytes(body), tuple(url_documents))


@functools.lru_cache(maxsize=1)
def _graphql_operations(body: bytes, url_documents: tuple[str, ...]) -> frozenset[str] | None:
    texts = graphql_documents(body, url_documents)
    if texts is None:
        return None
    found: set[str] = set()
    for text in texts:
        kinds = _operations(text)
        if not kinds:
            return None
        found.update(kinds)
    return frozenset(found)


def graphql_documents(body: bytes | None, url_documents: Iterable[str] = ()) -> list[str] | None:
    """Every GraphQL document a server may run for this request: the URL's, then each request
    object's ``query`` and its ``_json`` batch (:func:`graphql_operations` says why); None when one
    of them is missing or unreadable. ``body`` None: the URL's alone."""
    texts: list[object] = list(url_documents)
    if body is not None:
        document = json_document(body)
        requests = document if isinstance(document, list) else [document]
        if not requests:
            return None
        for request in requests:
            if not isinstance(request, dict):
                return None
            texts.append(request.get("query"))
            if "_json" in request:
                batch = request["_json"]
                if not isinstance(batch, list) or not batch:
                    return None
                for each in batch:
                    if not isinstance(each, dict):
                        return None
                    texts.append(each.get("query"))
    if not texts or not all(isinstance(text, str) for text in texts):
        return None
    return [str(text) for text in texts]


def graphql_summary(documents: Iterable[str], limit: int = 180) -> str | None:
    """What GraphQL ``documents`` run, on one line for a person deciding on the request: each
    operation's type and the root fields it runs, fragments expanded (``mutation
    deleteRepository``), writes first, each listed once, joined by ``; ``. Never an operation's
    name or a field's alias: the client chooses those (``mutation CreateIssue`` could delete).
    A line longer than ``limit`` is cut at an entry and says how many more there are (and whether
    a write is among them). None when a document cannot be read."""
    from graphql.error import GraphQLError
    from graphql.language import parse

    entries: list[tuple[str, str]] = []
    for text in documents:
        try:
            parsed = parse(text, no_location=True, max_tokens=MAX_GRAPHQL_TOKENS)
            found = _root_fields(parsed)
        except (GraphQLError, RecursionError, ValueError):
            return None
        if not found:  # no operation: not a document a server runs (as graphql_operations says)
            return None
        entries += found
    if not entries:
        return None
    order = {"mutation": 0, "subscription": 1, "query": 2}
    unique = sorted(dict.fromkeys(entries), key=lambda e: order.get(e[0], 0))
    shown: list[str] = []
    for index, (kind, fields) in enumerate(unique):
        entry = f"{kind} {fields}"
        rest = unique[index:]
        if len("; ".join([*shown, entry])) > limit - 40:  # room left for what is left out
            if not shown:  # the first entry alone is too long: as many of its fields as fit
                names = fields.split(", ")
                kept = [n for i, n in enumerate(names) if len(", ".join(names[: i + 1])) < 80]
                shown.append(f"{kind} {', '.join(kept)} (+{len(names) - len(kept)} more fields)")
                rest = rest[1:]
                if not rest:
                    break
            writes = sum(k != "query" for k, _ in rest)
            more = f"+{len(rest)} more" + (f", {writes} of them writes" if writes else "")
            return "; ".join([*shown, f"({more})"])
        shown.append(entry)
    return "; ".join(shown)


def _root_fields(document: Any) -> list[tuple[str, str]]:
    """(operation type, its root fields) for each operation of a parsed document, its fragments
    (named ones from the document, inline ones) expanded; a spread of an unknown fragment: ``?``."""
    from graphql.language import (
        FieldNode,
        FragmentDefinitionNode,
        FragmentSpreadNode,
        InlineFragmentNode,
        OperationDefinitionNode,
    )

    fragments = {
        node.name.value: node
        for node in document.definitions
        if isinstance(node, FragmentDefinitionNode)
    }

    done: dict[str, tuple[str, ...]] = {}  # each fragment's fields, worked out once

    def fields(selection_set: Any, seen: frozenset[str]) -> tuple[str, ...]:
        found: dict[str, None] = {}
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                found[selection.name.value] = None
            elif isinstance(selection, InlineFragmentNode):
                found.update(dict.fromkeys(fields(selection.selection_set, seen)))
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = fragments.get(name)
                if fragment is None or name in seen:
                    found["?"] = None
                    continue
                if name not in done:
                    done[name] = fields(fragment.selection_set, seen | {name})
                found.update(dict.fromkeys(done[name]))
        return tuple(found)

    out: list[tuple[str, str]] = []
    for node in document.definitions:
        if isinstance(node, OperationDefinitionNode):
            names = fields(node.selection_set, frozenset())
            out.append((str(node.operation.value), ", ".join(names) or "-"))
    return out


def _operations(text: str) -> frozenset[str] | None:
    from graphql.error import GraphQLError
    from graphql.language import OperationDefinitionNode, parse

    try:
        document = parse(text, no_location=True, max_tokens=MAX_GRAPHQL_TOKENS)
    except (GraphQLError, RecursionError, ValueError):
        return None
    kinds = frozenset(
        str(node.operation.value)
        for node in document.definitions
        if isinstance(node, OperationDefinitionNode)
    )
    return kinds or None


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# An RFC 9110 ``type/subtype``, lower-cased: what a media type must look like to be known.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
_MEDIA_END = re.compile(r"[;,\s]")
_FIELD_SEPARATOR = re.compile(r"[&;]")  # Rack 2 splits a form at either
_CHARSET = re.compile(r"""charset\s*=\s*["']?([^"';,\s]*)""", re.IGNORECASE)
# Charsets in which the bytes of ``&``, ``;``, ``=``, ``%`` and ``_method`` are those characters, so
# the raw bytes split here are the fields a server decodes. In another (UTF-16, UTF-7) a server that
# decodes by the declared charset (Tomcat, so Spring's ``_method`` filter) reads fields not seen here.
_ASCII_CHARSETS = frozenset(
    {"", "utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1", "windows-1252"}
)


def media_types(content_type: str | None) -> tuple[tuple[str, str], ...]:
    """``(media type, element)`` for each comma-separated element of a Content-Type value (several
    fields are joined with ", "), the type read as lenient servers read it: up to the first ``;``,
    ``,`` or whitespace, lower-cased. Rack splits at ``;`` or ``,`` and PHP also at a space, so
    ``application/x-www-form-urlencoded charset=x`` is a form there; a server taking the last of two
    fields reads the last element. Elements naming no type are left out."""
    if content_type is None:
        return ()
    found: list[tuple[str, str]] = []
    for element in content_type.split(","):
        element = element.strip()
        media = _MEDIA_END.split(element, 1)[0].lower()
        if media:
            found.append((media, element))
    return tuple(found)


def _maybe_form_type(media: str) -> bool:
    return media in FORM_TYPES or media.startswith("multipart/") or not _MEDIA_TYPE.fullmatch(media)


def maybe_form(content_type: str | None) -> bool:
    """Whether a server could read the body as an HTML form, and so its ``_method`` field as the
    real method: unless every type it names is known not to be a form. Rack reads a POST without a
    Content-Type as a form, and ``multipart/mixed`` and ``multipart/related`` as well as
    ``multipart/form-data``; a type that is not a ``type/subtype`` is not known to be anything."""
    types = media_types(content_type)
    return not types or any(_maybe_form_type(media) for media, _ in types)


def is_json(content_type: str | None) -> bool:
    """Whether the body is declared JSON (``application/json``, ``application/*+json``, parameters
    ignored) by every type the Content-Type names. Servers choose the parser by this header: a body
    that is valid JSON and also a valid form is run as the form by express-graphql or Rails when
    sent as one (or with no type), so a body condition read as JSON holds only for a JSON body."""
    types = media_types(content_type)
    return bool(types) and all(
        _MEDIA_TYPE.fullmatch(media) is not None
        and (
            media == "application/json"
            or (media.startswith("application/") and media.endswith("+json") and len(media) > 17)
        )
        for media, _ in types
    )


def form_methods(body: bytes, content_type: str | None) -> tuple[str, ...] | None:
    """The ``_method`` values of a body that may be an HTML form, read as every form a server could
    take it for (None: one of them cannot be read, so the request is ambiguous)."""
    types = [(media, element) for media, element in media_types(content_type)]
    readings = [(m, e) for m, e in types if _maybe_form_type(m)] if types else [("", "")]
    found: dict[str, None] = {}
    for media, element in readings:
        if media.startswith("multipart/"):
            methods = _multipart_methods(body, element, content_type or "")
        else:
            methods = _urlencoded_methods(body, element)
        if methods is None:
            return None
        found.update(dict.fromkeys(methods))
    return tuple(found)


def _urlencoded_methods(body: bytes, element: str) -> tuple[str, ...] | None:
    """Every field any common parser could find, not one strict reading: Rack 2 splits at ``;`` as
    well as ``&``; the bytes are split before decoding (as servers do), so no body is unreadable -
    except in a charset where those bytes are not those characters."""
    for charset in _CHARSET.findall(element):
        if charset.lower() not in _ASCII_CHARSETS:
            return None
    text = body.decode("latin-1")  # byte-transparent: each byte one character
    fields: list[tuple[str, str]] = []
    for piece in _FIELD_SEPARATOR.split(text):
        name, _, value = piece.partition("=")
        fields.append(
            (unquote_plus(name, encoding="latin-1"), unquote_plus(value, encoding="latin-1"))
        )
    return _method_values(fields)


_BOUNDARY = re.compile("boundary", re.IGNORECASE)
_RACK_BOUNDARY = re.compile(r'="?([^";,]+)')
_MENTIONS = 4  # of "boundary" in one Content-Type read at most (a real one names it once)
# RFC 2046: 1 to 70 of these, not ending in a space. Browsers, curl and every HTTP library keep to
# it; a longer one costs each search of the body its length at every byte.
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def _boundary(content_type: str) -> str | None:
    """The one boundary every server takes from the whole Content-Type, at each ``boundary`` in
    it (inside another parameter's name or value too): Rack matches ``boundary="?([^";,]+)``
    greedily, so at the last one; PHP finds the first with ``strstr`` and reads from the next
    ``=`` to the closing quote, or else to ``;`` or ``,``. None when they could differ, when
    ``boundary`` appears more often than any real Content-Type names it (each reading runs to
    the end of the header), or when it is not a boundary RFC 2046 allows."""
    mentions = list(itertools.islice(_BOUNDARY.finditer(content_type), _MENTIONS + 1))
    if len(mentions) > _MENTIONS:
        return None
    found: set[str] = set()
    for match in mentions:
        rack = _RACK_BOUNDARY.match(content_type, match.end())
        if rack is not None:
            found.add(rack.group(1))
        equals = content_type.find("=", match.end())
        if equals >= 0:
            if content_type.startswith('"', equals + 1):
                close = content_type.find('"', equals + 2)
                found.add(content_type[equals + 2 : close if close >= 0 else None])
            else:
                found.add(re.split("[;,]", content_type[equals + 1 :], maxsplit=1)[0])
    if len(found) != 1:
        return None
    (boundary,) = found
    return boundary if _BCHARS.fullmatch(boundary) else None


def _multipart_methods(body: bytes, element: str, content_type: str) -> tuple[str, ...] | None:
    # Imported here: only a multipart body needs the email package, and importing it at start costs
    # every gate (each `egress run` with its own gate) ~15 ms.
    from email.message import Message
    from email.parser import BytesParser
    from email.policy import HTTP
    from email.utils import collapse_rfc2231_value

    # Parsers take different boundaries from a Content-Type naming more than one (``boundary=a;
    # boundary=b``: the first here and in PHP, the last in Rack), and a body can be a form under
    # each: one reading must be the only one.
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    rack = _rack2_fields(body, boundary)
    if rack is None:
        return None
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + element.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects or message.get_boundary() != boundary:
        return None
    fields: list[tuple[str, str]] = []
    for part in message.iter_parts():
        if part.defects:
            return None
        payload = part.get_payload(decode=True)
        value = payload.decode("latin-1") if isinstance(payload, bytes) else ""
        # Every name a parser could give the part: each ``name`` (or RFC 2231 ``name*``) parameter
        # of its disposition, and its Content-ID (Rack 2 names a part without a name by it).
        # Read from the raw fields: the parsed header keeps one parameter of each name.
        names: list[str] = []
        for field, raw in part.raw_items():
            if field.lower() == "content-disposition":
                header = Message()
                header["Content-Disposition"] = str(raw)
                for key, param in header.get_params(header="content-disposition", failobj=[])[1:]:
                    if key.lower().rstrip("*") == "name":
                        names.append(collapse_rfc2231_value(param))
            elif field.lower() == "content-id":
                names += [str(raw).strip(), str(raw).strip().strip("<>")]
        fields += [(name, value) for name in dict.fromkeys(names)]
    return _method_values(fields + rack)  # (form_methods keeps each value once)


# Rack 2 (GitLab's, and every Rails before 7.1) names a part by patterns over its raw head, not by
# parsing it: unanchored (``X-Content-Disposition:`` matches too), greedy (the last ``; name=``
# before the next colon, inside another parameter's quoted value too), a quoted name unescaped
# (``\\x`` is ``x``), and a part without one by its ``Content-ID``; the head ends at the first
# CRLF CRLF only (a bare LF blank line does not end it) (lib/rack/multipart/parser.rb, 2.2).
_RACK_TOKEN = rb'[^\s()<>,;:\\"/\[\]?=]+'
_RACK_NAME = re.compile(
    rb'Content-Disposition:[^:]*;\s*name=("(?:\\"|[^"])*"|' + _RACK_TOKEN + rb")", re.IGNORECASE
)
_RACK_ID = re.compile(rb"Content-ID:\s*([^\r\n]*)", re.IGNORECASE)
_RACK_ESCAPE = re.compile(rb"\\(.)")


def _rack2_fields(body: bytes, boundary: str) -> list[tuple[str, str]] | None:
    """Every (name, value) Rack 2's pattern finds in the raw parts (each of its matches, where
    Rack takes the first); None when a part's head has no end Rack would find before the next
    part (Rack would read on into it), or past the bounds on parts and heads: the email package's
    reading of a part's parameters grows faster than the head (a 400 KB one took 2 s, on the event
    loop), and each part costs it ~80 us (a 1 MiB body of tiny parts: 1.6 s)."""
    marks = _delimiters(body, b"--" + boundary.encode("latin-1"))
    if marks is None:
        return None
    fields: list[tuple[str, str]] = []
    for (_, after, last), (before, _, _) in itertools.pairwise(marks):
        if last:
            break
        part = body[after:before]
        end = part.find(b"\r\n\r\n")
        if end < 0 or end > MAX_PART_HEAD:
            return None
        value = part[end + 4 :].decode("latin-1")
        head = part[: end + 2]
        for found in _RACK_NAME.finditer(head):
            name = found.group(1)
            if name.startswith(b'"') and name.endswith(b'"') and len(name) > 1:
                name = _RACK_ESCAPE.sub(rb"\1", name[1:-1])
            fields.append((name.decode("latin-1"), value))
        for found in _RACK_ID.finditer(head):  # (read whether or not a name was: more, not less)
            fields.append((found.group(1).decode("latin-1"), value))
    return fields


def _delimiters(body: bytes, dashed: bytes) -> list[tuple[int, int, bool]] | None:
    """Where ``body`` splits into parts: each ``--boundary`` followed by CRLF or ``--`` (the closing
    one), a CRLF before it belonging to it: (start, end, closing). None when the boundary's text is
    anywhere else, past the closing line's end, or in more than MAX_FORM_PARTS places: parsers read
    such lines differently (Rack 2 takes any line that strips to ``--boundary``, ``--boundary \r``
    too, and reads on past a closing line with more on it; the email package splits at
    ``--boundary`` and spaces), and a form's values never hold its boundary. Found with
    ``bytes.find``, in time linear in the body."""
    marks: list[tuple[int, int, bool]] = []
    taken = 0  # where the last delimiter ended
    at = body.find(dashed)
    while at >= 0:
        if len(marks) > MAX_FORM_PARTS:
            return None
        tail = body[at + len(dashed) : at + len(dashed) + 2]
        if tail not in (b"\r\n", b"--"):
            return None
        start = at - 2 if at - 2 >= taken and body[at - 2 : at] == b"\r\n" else at
        taken = at + len(dashed) + 2
        marks.append((start, taken, tail == b"--"))
        if tail == b"--":
            end = body[taken : taken + 2]
            if end not in (b"", b"\r\n") or body.find(dashed, taken) >= 0:
                return None
            break
        at = body.find(dashed, taken)
    return marks


def is_method_field(name: str) -> bool:
    """``_method`` as PHP (Laravel, Symfony) names it too (:func:`proxy.core.paths.php_name`:
    leading spaces dropped, ``.`` and `` `` made ``_``, a leading ``[`` made ``_``, and
    ``_method[...]`` the same variable; case ignored). PHP names a query string's parameters the
    same way, and Symfony reads ``_method`` from there too, so the request step applies this to the
    query as well as to a form body."""
    return php_name(name) == "_method"


def _method_values(fields: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(value.strip().upper() for name, value in fields if is_method_field(name))


__all__ = [
    "FORM_TYPES",
    "form_methods",
    "graphql_operations",
    "is_json",
    "is_method_field",
    "json_document",
    "json_field",
    "maybe_form",
    "media_types",
]
