"""The hash chain's canonical form: what the writer seals is what verify recomputes."""

from __future__ import annotations

import json

from proxy.evidence.journal.chain import canonical, record_hash, render, seal


def test_seal_is_render_of_record_hash() -> None:
    body = {"seq": 3, "prev": "0" * 64, "host": "pypi.org", "port": 443, "event": "egress.decision"}
    digest, line = seal(body)
    assert digest == record_hash(body)
    assert line == render(body, digest).encode("ascii")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {**body, "hash": digest}


def test_canonical_form_is_sorted_compact_ascii() -> None:
    text = canonical({"b": 1, "a": "é\n\x00"})
    assert text == '{"a":"\\u00e9\\n\\u0000","b":1}'
    assert text.isascii()


def test_any_change_changes_the_hash() -> None:
    body = {"seq": 1, "prev": "0" * 64, "host": "pypi.org"}
    assert record_hash(body) != record_hash({**body, "host": "pypi.org."})
    assert record_hash(body) != record_hash({**body, "seq": 2})


def test_an_empty_body_still_renders_valid_json() -> None:
    digest, line = seal({})
    assert json.loads(line) == {"hash": digest}
