"""Body conditions: what a held request body says, read by real parsers and never by pattern.

A body is judged only when a rule needs it (GraphQL operations, a JSON field such as Git LFS's batch
``operation``, an HTML form's ``_method``). Whatever a parser cannot read unambiguously - invalid JSON,
a key given twice (parsers disagree on which copy wins), two keys differing only in case (Go's
decoder takes them for one), a GraphQL document that does not parse - answers None: an allow rule
then does not match and a deny rule does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

MAX_GRAPHQL_TOKENS = 10_000
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


def json_document(body: bytes) -> Any | None:
    """The parsed JSON document, or None when it is not JSON a server would read the same way."""
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
    struct's fields case-insensitively, and the last one wins - not the copy read here."""
    for each in value if isinstance(value, list) else [value]:
        if isinstance(each, dict) and len({key.casefold() for key in each}) != len(each):
            return True
    return False


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
    servers modelled on it run *instead of* the body's document: each is judged as well."""
    document = json_document(body)
    requests = document if isinstance(document, list) else [document]
    if not requests:
        return None
    texts: list[object] = list(url_documents)
    for request in requests:
        if not isinstance(request, dict):
            return None
        texts.append(request.get("query"))
    found: set[str] = set()
    for text in texts:
        if not isinstance(text, str):
            return None
        kinds = _operations(text)
        if not kinds:
            return None
        found.update(kinds)
    return frozenset(found)


def _operations(text: str) -> set[str] | None:
    from graphql.error import GraphQLError
    from graphql.language import OperationDefinitionNode, parse

    try:
        document = parse(text, no_location=True, max_tokens=MAX_GRAPHQL_TOKENS)
    except (GraphQLError, RecursionError, ValueError):
        return None
    kinds = {
        str(node.operation.value)
        for node in document.definitions
        if isinstance(node, OperationDefinitionNode)
    }
    return kinds or None


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def is_form(content_type: str | None) -> bool:
    """Rack, Laravel and others read a ``_method`` field from these bodies as the real method."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in FORM_TYPES


def form_methods(body: bytes, content_type: str) -> tuple[str, ...] | None:
    """The ``_method`` values of an HTML form body (None: a form that cannot be read)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            fields = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except (UnicodeDecodeError, ValueError):
            return None
        return _method_values((name, value) for name, value in fields)
    return _multipart_methods(body, content_type)


def _multipart_methods(body: bytes, content_type: str) -> tuple[str, ...] | None:
    # Imported here: only a multipart body needs the email package, and importing it at start costs
    # every gate (each `egress run` with its own gate) ~15 ms.
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        return None
    fields: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        value = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        fields.append((name, value))
    return _method_values(fields)


def _method_values(fields: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(value.strip().upper() for name, value in fields if name.lower() == "_method")


__all__ = [
    "FORM_TYPES",
    "form_methods",
    "graphql_operations",
    "is_form",
    "json_document",
    "json_field",
]
