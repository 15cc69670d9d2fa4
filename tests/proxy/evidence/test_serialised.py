"""Each record is built and encoded once for the journal and the JSON decision log: with a journal the
log line is the exact text the journal hashed, without one it is the canonical JSON of the record."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.decision import Reason, Verdict
from proxy.evidence.emit import AuditUnavailable, Emitter, JsonLineSink
from proxy.evidence.journal.chain import canonical, seal, seal_text
from proxy.evidence.journal.verify import verify
from proxy.evidence.journal.writer import Journal
from proxy.evidence.record import connection_closed, decision_record
from proxy.evidence.serialised import Serialised, serialise_decision, serialise_event
from tests.proxy.evidence.decisions import allow, deny_http, dns_query

HOSTILE = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
) | st.sampled_from(['evil\n{"seq":99,"forged":true}\r\x00', '","hash":"', "\u2028é\x7f"])


def test_the_fields_are_the_decision_record() -> None:
    for d in (allow(), deny_http(), dns_query(), allow(context={"task": "T-1"}, argv=("a", "b"))):
        assert serialise_decision(d).fields == decision_record(d)


def test_without_a_journal_the_line_is_the_canonical_record() -> None:
    d = deny_http()
    assert serialise_decision(d).line() == (canonical(decision_record(d)) + "\n").encode()


def test_seal_text_is_the_line_without_its_hash() -> None:
    body = {"seq": 1, "prev": "0" * 64, "host": "pypi.org"}
    digest, text, line = seal_text(body)
    assert (digest, line) == seal(body)
    assert hashlib.sha256(text).hexdigest() == digest
    assert line == text[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def _log_lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@given(host=HOSTILE, detail=HOSTILE, path=HOSTILE)
def test_the_log_line_is_the_text_the_journal_hashed(
    tmp_path_factory: Any, host: str, detail: str, path: str
) -> None:
    journal_path = tmp_path_factory.mktemp("j") / "audit.jsonl"
    journal = Journal(journal_path, fsync="never")
    stream = io.StringIO()
    emitter = Emitter([JsonLineSink(stream=stream)], write_ahead=[journal])
    d = allow(host=host, detail=detail, path=path)
    emitter.emit(d)
    emitter.connection_closed(d, bytes_out=1, bytes_in=2, duration=0.5)
    journal.close()
    raw = journal_path.read_bytes().splitlines()
    logged = _log_lines(stream)
    assert len(raw) == len(logged) == 2
    for record, line in zip(raw, logged, strict=True):
        parsed = json.loads(record)
        assert line.encode() + b"\n" == record[: record.rindex(b',"hash"')] + b"}\n"
        assert hashlib.sha256(line.encode()).hexdigest() == parsed["hash"]
        assert json.loads(line) == {k: v for k, v in parsed.items() if k != "hash"}
    assert json.loads(logged[0])["host"] == host and json.loads(logged[0])["seq"] == 1
    assert verify([journal_path]).ok


def test_a_record_the_journal_could_not_write_is_logged_as_its_decision(tmp_path: Path) -> None:
    class Broken:
        def record(self, decision: Any) -> None:
            raise AuditUnavailable("disk full")

        def close(self) -> None:
            pass

    stream = io.StringIO()
    emitter = Emitter([JsonLineSink(stream=stream)], write_ahead=[Broken()], audit_required=True)
    returned = emitter.emit(allow())
    line = json.loads(_log_lines(stream)[0])
    assert returned.decision is Verdict.DENY
    assert line["decision"] == "deny" and line["reason"] == Reason.AUDIT_UNAVAILABLE
    assert "seq" not in line and "hash" not in line


def test_a_failed_journal_write_leaves_nothing_for_the_log_to_reuse(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "audit.jsonl", fsync="never")
    journal.close()  # every write now fails
    serialised = serialise_decision(allow())
    with contextlib.suppress(AuditUnavailable):
        journal.record_serialised(allow(), serialised)
    assert serialised.hashed is None
    assert b'"seq"' not in serialised.line()


def test_events_are_shared_only_when_both_sinks_record_the_same_fields() -> None:
    name, fields = connection_closed(allow(), bytes_out=1, bytes_in=2, duration=0.1)
    shared = serialise_event(name, fields)
    assert isinstance(shared, Serialised)
    assert shared.fields == {**fields, "event": name}
    assert serialise_event("egress.other", {"x": 1}) is None  # the journal would add a ts
    assert serialise_event("egress.other", {"ts": 1.0, "event": "y"}) is None


def test_an_event_without_ts_is_logged_without_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "audit.jsonl", fsync="never")
    stream = io.StringIO()
    emitter = Emitter([JsonLineSink(stream=stream)], write_ahead=[journal])
    emitter.event("egress.other", {"x": 1})
    journal.close()
    assert json.loads(_log_lines(stream)[0]) == {"event": "egress.other", "x": 1}
    assert "ts" in json.loads((tmp_path / "audit.jsonl").read_text())


def test_a_log_file_gets_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    sink = JsonLineSink(path=str(path))
    for i in range(3):
        sink.record(allow(i))
    sink.event("egress.other", {"x": "a\nb"})
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["host"] for line in lines[:3]] == [
        "h0.pypi.org",
        "h1.pypi.org",
        "h2.pypi.org",
    ]
    assert json.loads(lines[3]) == {"event": "egress.other", "x": "a\nb"}
