"""What an approval is about: host and port for host rules, plus method and path for request rules."""

from __future__ import annotations

from proxy.approvals.model import Subject
from proxy.core.decision import Decision, Kind, Reason, Verdict


def ask(kind: Kind, sandbox: str | None = "sbx-1") -> Decision:
    return Decision(
        Verdict.ASK, Reason.APPROVAL_PENDING, "r", kind, "api.test", 443, "v", "enforce",
        method="post", path="/repo.git/git-receive-pack", sandbox_id=sandbox,
    )  # fmt: skip


def test_host_rules_ask_about_host_and_port() -> None:
    for kind in (Kind.CONNECT, Kind.HTTP):
        assert Subject.of(ask(kind)) == Subject("sbx-1", "api.test", 443, rule="r")
    assert Subject.of(ask(Kind.CONNECT, None)).sandbox == "-"


def test_request_rules_ask_about_one_method_and_path() -> None:
    subject = Subject.of(ask(Kind.HTTP), per_request=True)
    assert subject == Subject(
        "sbx-1", "api.test", 443, "POST", "/repo.git/git-receive-pack", rule="r"
    )
    assert subject.key != Subject.of(ask(Kind.HTTP)).key
    assert subject.describe() == "POST api.test:443/repo.git/git-receive-pack"


def test_an_overridden_method_is_part_of_what_is_asked() -> None:
    """The server acts on a method override: the approval names it, and never equals (nor joins,
    nor is answered by the grant of) a request sent with the method of its request line alone."""
    plain = Subject.of(ask(Kind.HTTP), per_request=True)
    assert Subject.of(ask(Kind.HTTP), per_request=True, methods=("POST",)) == plain
    overridden = Subject.of(ask(Kind.HTTP), per_request=True, methods=("POST", "delete"))
    assert overridden.method == "DELETE (sent as POST)"
    assert overridden.key != plain.key
    assert overridden.describe().startswith("DELETE (sent as POST) api.test:443/")
    # host rules ask about host and port whatever the method
    assert Subject.of(ask(Kind.HTTP), methods=("POST", "DELETE")) == Subject.of(ask(Kind.HTTP))


def test_keys_are_fixed_length_whatever_the_client_sent() -> None:
    long = Subject("sbx-1", "a" * 200, 443, "GET", "/" + "x" * 10_000)
    assert len(long.key) == 32 and long.key != Subject("sbx-1", "a" * 200, 443).key


def test_the_asking_rule_and_who_may_answer_it_are_part_of_what_is_asked() -> None:
    """Two ask rules matching one request line ask two questions: neither joins the other's pending
    approval nor rides on its grant (a reviewer's answer to one is never a person's to the other)."""
    auto = Subject.of(ask(Kind.HTTP), per_request=True, review="auto")
    human = Subject.of(ask(Kind.HTTP), per_request=True, review="human")
    other = Subject.of(ask(Kind.HTTP).with_(rule="other"), per_request=True, review="auto")
    assert auto.rule == "r" and auto.review == "auto"
    assert auto != human and auto.key != human.key
    assert not auto.covers(human) and not human.covers(auto)
    assert other.rule == "other" and other.key != auto.key and not auto.covers(other)


def test_a_request_rule_asks_about_the_exact_query_and_shows_it_as_recorded() -> None:
    """Two requests whose queries differ only in a value (which the record scrubs) are two
    questions; the same query is one. Only a digest of the query sent is kept: what is shown is
    the query as recorded."""
    recorded = ask(Kind.HTTP).with_(query="name=")
    benign = Subject.of(recorded, per_request=True, query="name=notes.txt")
    leak = Subject.of(recorded, per_request=True, query="name=s3cret")
    assert benign.key != leak.key and not benign.covers(leak)
    assert Subject.of(recorded, per_request=True, query="name=notes.txt") == benign
    assert (benign.query, leak.query) == ("name=", "name=")
    assert "s3cret" not in repr(leak) and "s3cret" not in leak.describe()
    # shown alike but for the size of the query sent (values are not recorded here)
    assert benign.describe() == "POST api.test:443/repo.git/git-receive-pack?name= (14 bytes sent)"
    assert leak.describe().endswith("?name= (11 bytes sent)")
    assert benign.summary() == benign.describe()
    # recorded with values, the query shown is the query sent: no size is added
    whole = Subject.of(ask(Kind.HTTP).with_(query="a=1"), per_request=True, query="a=1")
    assert whole.describe().endswith("git-receive-pack?a=1")
    # a target ending in a bare "?" is not the same request as one without a query
    bare = Subject.of(ask(Kind.HTTP), per_request=True, query="")
    none = Subject.of(ask(Kind.HTTP), per_request=True)
    assert bare.key != none.key and bare.describe().endswith("receive-pack?")
    # without the exact query, a request recorded with one is a question of its own: joined on
    # the recorded form, requests whose values differ would share one answer
    unknown = Subject.of(recorded, per_request=True)
    assert unknown.query == "name=" and unknown.key != Subject.of(recorded, per_request=True).key
    # host rules ask about host and port whatever the query
    assert Subject.of(recorded, query="name=s3cret") == Subject.of(ask(Kind.HTTP))


def test_a_session_grant_is_about_the_method_and_path_with_any_query() -> None:
    subject = Subject.of(ask(Kind.HTTP).with_(query="page="), per_request=True, query="page=2")
    granted = subject.granted()
    assert (granted.query, granted.query_id, granted.query_bytes) == (None, None, None)
    assert granted == Subject.of(ask(Kind.HTTP), per_request=True)
    # a subject without a query keeps the key it always had (grants stored by an earlier gate)
    assert granted.key == Subject.of(ask(Kind.HTTP), per_request=True).key


def test_what_an_approval_is_about_is_read_back_with_the_same_key() -> None:
    """Stores keep approvals as the admin API's JSON: the query's digest must survive the trip, or
    an approval read back would be about another request than the one it was opened for."""
    from proxy.approvals.model import Approval

    decision = ask(Kind.HTTP).with_(query="name=")
    subject = Subject.of(decision, per_request=True, query="name=x")
    approval = Approval.open(decision, subject, "human", 60, 1000.0)
    back = Approval.from_json(approval.to_json())
    assert back.subject == approval.subject and back.subject.key == approval.subject.key
    assert approval.to_json()["query"] == "name="


def test_a_long_or_hostile_query_is_escaped_and_bounded_on_a_terminal() -> None:
    from proxy.approvals.model import SHOWN_QUERY

    subject = Subject.of(
        ask(Kind.HTTP).with_(query="a=\x1b[2J" + "q" * 1000), per_request=True, query="x"
    )
    line = subject.summary()
    assert "\x1b" not in line and line.isprintable()
    assert line.startswith("POST api.test:443/repo.git/git-receive-pack?")
    assert len(line) < len("POST api.test:443/repo.git/git-receive-pack?") + SHOWN_QUERY + 40


def test_the_digest_of_a_query_gives_no_value_away() -> None:
    """The digest is shown (admin API, event stream, webhook, stores): computed without a key, a
    short value the records scrub would be found by trying every value (``otp=482913``)."""
    import hashlib

    from proxy.approvals.model import query_digest

    assert query_digest("otp=482913") == query_digest("otp=482913")
    assert query_digest("otp=482913") != query_digest("otp=482914")
    for guess in ("otp=482913",):
        assert query_digest("otp=482913") != hashlib.sha256(guess.encode()).hexdigest()[:32]


def test_a_grant_is_stored_without_the_query_fields_an_earlier_gate_cannot_read() -> None:
    from proxy.approvals.model import Grant

    subject = Subject.of(ask(Kind.HTTP).with_(query="page="), per_request=True, query="page=2")
    stored = Grant(subject.granted(), "a1", "alice", 2000.0).to_json()
    assert not {"query", "query_id", "query_bytes"} & set(stored["subject"])
    assert Grant.from_json(stored).subject == subject.granted()


def test_a_held_body_is_part_of_what_a_request_rule_asks_about() -> None:
    """Under a rule that reads bodies, two mutations to one path are two questions; the body is
    kept as a digest and its size only, and a session grant covers any body."""
    decision = ask(Kind.HTTP).with_(path="/graphql")
    create = Subject.of(decision, per_request=True, body=b'{"query":"mutation{createIssue}"}')
    delete = Subject.of(decision, per_request=True, body=b'{"query":"mutation{deleteRepo}"}')
    assert create.key != delete.key and not create.covers(delete)
    assert (
        Subject.of(decision, per_request=True, body=b'{"query":"mutation{createIssue}"}') == create
    )
    assert create.describe() == "POST api.test:443/graphql (a body of 33 bytes)"
    # what it runs, read by the checkpoint, is shown with it (and is not part of the key)
    told = Subject.of(decision, per_request=True, body=b"{}", runs="mutation deleteRepo")
    assert told.describe().endswith("/graphql (a body of 2 bytes; runs mutation deleteRepo)")
    assert told.key == Subject.of(decision, per_request=True, body=b"{}").key
    assert told.summary() == told.describe()
    other = Subject.of(decision, per_request=True, body=b"name=x&secret=y")
    assert other.runs is None and other.describe().endswith("(a body of 15 bytes)")
    assert create.granted() == Subject.of(decision, per_request=True)
    # a host rule asks about host and port whatever the body
    assert Subject.of(decision, body=b"x") == Subject.of(decision)


FIELDS = ((b"Host", b"api.test"), (b"User-Agent", b"curl/8"), (b"Accept", b"*/*"))


def test_the_header_fields_as_sent_are_part_of_what_a_request_rule_asks_about() -> None:
    """A field carries data as well as a query does: a request with another field, another value
    or the same fields in another order is another question; only their keyed digest and size are
    kept, and a session grant covers any fields."""
    from proxy.approvals.model import _digest

    decision = ask(Kind.HTTP)
    plain = Subject.of(decision, per_request=True, fields=FIELDS)
    assert Subject.of(decision, per_request=True, fields=list(FIELDS)) == plain
    assert plain.head_bytes == sum(len(n) + len(v) + 4 for n, v in FIELDS) == 49
    others = [
        (*FIELDS, (b"X-Note", b"s3cret")),
        (FIELDS[0], FIELDS[1], (b"Accept", b"*/+")),
        (FIELDS[2], FIELDS[1], FIELDS[0]),
        # a name and value that run together the same way once joined
        (FIELDS[0], FIELDS[1], (b"Accept*", b"/*")),
    ]
    keys = {Subject.of(decision, per_request=True, fields=f).key for f in others}
    assert len(keys) == len(others) and plain.key not in keys
    assert plain.head_id != _digest(b"".join(n + v for n, v in FIELDS))
    # keyed, as the query's digest: a short value is not found by trying every value
    import hashlib

    joined = b"".join(b"%d:%s%d:%s" % (len(n), n, len(v), v) for n, v in FIELDS)
    assert plain.head_id not in (
        hashlib.sha256(joined).hexdigest()[:32],
        hashlib.sha256(b"".join(n + v for n, v in FIELDS)).hexdigest()[:32],
    )
    assert plain.describe() == (
        "POST api.test:443/repo.git/git-receive-pack (header fields of 49 bytes)"
    )
    assert "curl" not in str(plain)
    granted = plain.granted()
    assert (granted.head_id, granted.head_bytes) == (None, None)
    # a host rule's approval is about host and port whatever the fields
    assert Subject.of(ask(Kind.CONNECT), fields=FIELDS).head_id is None


def test_a_body_the_gate_did_not_read_makes_a_question_that_joins_no_other() -> None:
    from proxy.approvals.model import UNREAD, Approval, summary

    decision = ask(Kind.HTTP)
    first = Subject.of(decision, per_request=True, unread=5)
    second = Subject.of(decision, per_request=True, unread=5)
    assert first.body_id is not None and first.body_id.startswith(UNREAD)
    assert first.key != second.key and first.body_bytes == 5
    assert first.describe().endswith("git-receive-pack (a body of 5 bytes, not read)")
    unknown = Subject.of(decision, per_request=True, unread=None, fields=FIELDS)
    assert unknown.describe().endswith(
        "(header fields of 49 bytes; a body of unknown length, if any, not read)"
    )
    assert unknown.summary().endswith("; a body of unknown length, if any, not read)")
    assert Subject.of(decision, per_request=True, unread=0).body_id is None
    # a held body is the body itself, whatever was said of its length
    assert not (
        Subject.of(decision, per_request=True, body=b"{}", unread=2).body_id or ""
    ).startswith(UNREAD)
    # read back (stores, admin API): still a body not read
    opened = Approval.open(decision, unknown, "human", 60, 1.0)
    back = Approval.from_json(opened.to_json())
    assert back.subject == opened.subject and back.subject.describe() == unknown.describe()
    line = summary("api.test", 443, "POST", "/x", body_bytes=7, head_bytes=3, body_read=False)
    assert line == "POST api.test:443/x (header fields of 3 bytes; a body of 7 bytes, not read)"
