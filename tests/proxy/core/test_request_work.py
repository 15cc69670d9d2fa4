"""The work the request step does on a held body grows no faster than the body.

A held body is at most HOLD_LIMIT (1 MiB) and is judged on the event loop that serves every
connection, so one request must not hold it for seconds. These tests count operations (reads,
parses, comparisons, memory), never time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import proxy.core.bodies as bodies
import proxy.core.requests as requests_step
from proxy.core.decision import Kind, Request
from proxy.core.engine import decide
from proxy.core.requests import HttpHead
from proxy.policy.loader import load_policy

FORM = "application/x-www-form-urlencoded"


def _policy(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


OPEN = """
version: 1
rules:
  - name: open-api
    hosts: [open.test]
  - name: open-no-delete
    action: deny
    hosts: [open.test]
    methods: [DELETE]
"""


def test_a_form_with_many_method_fields_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The form's ``_method`` values are judged together: judged one at a time, each re-judging
    the request and reading the body again, a 10 KB body of 800 values took 5.9 s and a 1 MiB
    body of 100 values 43 s."""
    policy = _policy(tmp_path, OPEN)
    reads = 0
    real = requests_step.form_methods

    def counted(body: bytes, content_type: str | None):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return real(body, content_type)

    monkeypatch.setattr(requests_step, "form_methods", counted)
    body = "&".join(f"_method=M{i}" for i in range(60)).encode()
    head = HttpHead("POST", "/x", body_size=len(body), content_type=FORM, body=body)
    decide(Request(Kind.REQUEST, "open.test", 443, "POST", "/x", http=head), policy)
    assert reads <= 2, f"the held form was read {reads} times for one request"


GRAPHQL = """
version: 1
rules:
  - name: graphql-read
    hosts: [api.test]
    paths: [/graphql]
    graphql_operations: [query]
"""


def test_a_held_json_body_is_parsed_once_whatever_the_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every body rule judges the request for every method it may be read as (up to 256
    ``_method`` query parameters and 100 header fields): parsed each time, a 1 MB GraphQL body
    with 200 overrides took 10.6 s."""
    policy = _policy(tmp_path, GRAPHQL)
    parses = 0
    real = bodies.json.loads

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal parses
        parses += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(bodies.json, "loads", counted)
    body = json.dumps({"query": "query { a }", "n": str(tmp_path)}).encode()  # (a body of its own)
    target = "/graphql?" + "&".join(f"_method=M{i}" for i in range(50))
    head = HttpHead("POST", target, body_size=len(body), content_type="application/json", body=body)
    decide(Request(Kind.REQUEST, "api.test", 443, "POST", "/graphql", http=head), policy)
    assert parses == 1, f"the held body was parsed {parses} times for one request"


class _Counted(str):
    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_reading_a_body_as_two_forms_is_not_quadratic(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body read under each form type its Content-Type names gives each reading's values once,
    merged in time linear in them (merged as a list, 1,000 parts and ~77,000 urlencoded fields in
    ~1 MiB cost 1.45 s)."""
    real = bodies._method_values

    def counted(fields):  # type: ignore[no-untyped-def]
        return tuple(_Counted(each) for each in real(fields))

    monkeypatch.setattr(bodies, "_method_values", counted)
    parts, fields = 200, 2000
    body = b"".join(
        b"--B\r\nContent-Disposition: form-data; name=_method\r\n\r\nP%d\r\n" % i
        for i in range(parts)
    )
    filler = b"&" + b"&".join(b"_method=M%d" % i for i in range(fields)) + b"&"
    body += b"--B\r\nContent-Disposition: form-data; name=x\r\n\r\n" + filler + b"\r\n--B--\r\n"
    _Counted.compared = 0
    found = bodies.form_methods(body, "multipart/form-data; boundary=B, " + FORM)
    assert found is None or len(found) <= parts + fields + 1
    assert _Counted.compared <= 10 * (parts + fields), (
        f"{_Counted.compared} comparisons for {parts} + {fields} values"
    )


def test_a_content_type_naming_boundary_many_times_is_read_in_linear_memory() -> None:
    """A Content-Type naming ``boundary`` more often than any real one is unreadable before each
    mention is read to the header's end: a 58 KB one (within the 64 KiB head) of ``boundary=``
    repeated cost 2.9 s and 182 MiB that way."""
    import tracemalloc

    content_type = "multipart/form-data; " + "boundary=" * 6500
    tracemalloc.start()
    try:
        found = bodies.form_methods(b"x", content_type)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found is None
    assert peak <= 4 * 2**20, f"{peak / 2**20:.0f} MiB to read one {len(content_type)}-byte header"


def test_a_boundary_longer_than_any_server_accepts_is_refused_before_the_body_is_scanned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RFC 2046 allows a boundary of 70 characters; a longer one is unreadable before the body is
    searched for it (each search costs the boundary's length at every byte of the body: an
    8,000-byte boundary and 128 KiB of ``-`` took 1.8 s)."""
    scanned: list[int] = []
    real = bodies._rack2_fields

    def recorded(body: bytes, boundary: str):  # type: ignore[no-untyped-def]
        scanned.append(len(boundary))
        return real(body, boundary)

    monkeypatch.setattr(bodies, "_rack2_fields", recorded)
    boundary = "-" * 2000 + "x"
    found = bodies.form_methods(b"-" * 4096, "multipart/form-data; boundary=" + boundary)
    assert found is None
    assert all(length <= 70 for length in scanned), (
        f"a {max(scanned)}-byte boundary was scanned for"
    )
