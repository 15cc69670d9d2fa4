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
