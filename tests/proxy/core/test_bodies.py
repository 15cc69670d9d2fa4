"""Body conditions read with real parsers: what they find, and None for anything ambiguous."""

from __future__ import annotations

import json

import pytest

from proxy.core.bodies import (
    form_methods,
    graphql_operations,
    is_form,
    json_document,
    json_field,
)


def gql(query: object, **extra: object) -> bytes:
    return json.dumps({"query": query, **extra}).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (gql("{ viewer { login } }"), {"query"}),
        (gql("query Q { a }"), {"query"}),
        (gql("mutation M { a }"), {"mutation"}),
        (gql("subscription S { a }"), {"subscription"}),
        (gql("query A { a } mutation B { b }", operationName="A"), {"query", "mutation"}),
        (gql("# mutation { b }\n{ a }"), {"query"}),  # a comment is not an operation
        (gql('{ a(s: "mutation { b }") }'), {"query"}),  # nor is a string argument
        (gql("fragment F on T { a } query { ...F }"), {"query"}),
        (b'[{"query": "{ a }"}, {"query": "mutation { b }"}]', {"query", "mutation"}),
        (gql("fragment F on T { a }"), None),  # nothing to run
        (gql("mutation"), None),  # does not parse
        (gql(42), None),
        (b'{"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab"}}}', None),
        (b'{"query": "{ a }", "query": "mutation { b }"}', None),  # duplicate key
        (b"[]", None),
        (b"[1]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (gql("{ " + "a " * 20_000 + "}"), None),  # more tokens than the parser is allowed
        (b"[" * 200 + b"]" * 200, None),
    ],
)
def test_graphql_operations(body: bytes, expected: set[str] | None) -> None:
    found = graphql_operations(body)
    assert found == (frozenset(expected) if expected is not None else None)


def test_json_rejects_duplicate_keys_at_any_depth() -> None:
    assert json_document(b'{"a": {"b": 1, "b": 2}}') is None
    assert json_document(b'{"a": {"b": 1}}') == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b'{"operation": "download", "objects": []}', "download"),
        (b'{"operation": "upload"}', "upload"),
        (b'{"operation": ["download"]}', None),
        (b'{"Operation": "download"}', None),
        (b'[{"operation": "download"}]', None),
        (b'{"operation": "download", "operation": "upload"}', None),
    ],
)
def test_json_field(body: bytes, value: str | None) -> None:
    assert json_field(body, "operation") == value


def test_forms_carry_method_overrides() -> None:
    urlencoded = "application/x-www-form-urlencoded; charset=utf-8"
    assert is_form(urlencoded) and is_form("multipart/form-data; boundary=x")
    assert not is_form("application/json") and not is_form(None)
    assert form_methods(b"a=1&_method=delete", urlencoded) == ("DELETE",)
    assert form_methods(b"_METHOD=put&_method=patch", urlencoded) == ("PUT", "PATCH")
    assert form_methods(b"a=1", urlencoded) == ()
    assert form_methods(b"a=1&&&=", urlencoded) is None  # unreadable
    assert form_methods(b"\xff", urlencoded) is None
    multipart = (
        b'--XX\r\nContent-Disposition: form-data; name="title"\r\n\r\nhello\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XX--\r\n'
    )
    assert form_methods(multipart, "multipart/form-data; boundary=XX") == ("DELETE",)
    assert form_methods(b"garbage", "multipart/form-data; boundary=XX") is None


def test_a_graphql_document_in_the_url_is_judged_with_the_body() -> None:
    """express-graphql reads ``?query=`` before the body's document: both are judged."""
    body = json.dumps({"query": "{ viewer { login } }"}).encode()
    assert graphql_operations(body) == {"query"}
    assert graphql_operations(body, ["mutation { createGist { id } }"]) == {"query", "mutation"}
    assert graphql_operations(body, ["{ a }"]) == {"query"}
    assert graphql_operations(body, [""]) is None  # not a document: could be anything


def test_keys_differing_only_in_case_are_unreadable() -> None:
    """Go's encoding/json folds case (Kelvin sign and long s included) and the last copy wins."""
    assert json_field(b'{"operation": "download", "Operation": "upload"}', "operation") is None
    assert json_field('{"objects": [], "\u212aey": 1, "key": 2}'.encode(), "objects") is None
    assert graphql_operations(b'[{"query": "{ a }", "QUERY": "mutation { b }"}]') is None
    # nested objects are data the rules do not read
    assert json_field(b'{"operation": "download", "x": {"a": 1, "A": 2}}', "operation") == (
        "download"
    )
