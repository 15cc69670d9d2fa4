"""The console's HTTP side on a real ``egress serve --admin``: the login form, sessions, CSRF and
same-site checks, headers, and that neither a cookie reaches the API nor a sandbox the console."""

from __future__ import annotations

import re
import signal
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
import requests

from proxy.approvals.console.handlers import HERE
from tests.approvals_harness import ApprovalGate
from tests.dnsfake import FakeDns
from tests.harness import curl, on_a_free_port

REPO = Path(__file__).resolve().parents[4]
MISSING = "0123456789abcdef"  # a well-formed approval id that does not exist: 404 once checks pass


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApprovalGate]:
    directory = tmp_path_factory.mktemp("console-gate")
    policy = directory / "policy.yaml"

    def start(admin_port: int) -> ApprovalGate:
        # Even a policy that opens loopback on the admin port does not route a sandbox there.
        policy.write_text(
            "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
            f"  - name: loopback-opened\n    cidrs: [127.0.0.0/8]\n    ports: [{admin_port}]\n"
        )
        return ApprovalGate(policy, dns.nameserver, directory, admin_port=admin_port)

    with FakeDns() as dns:
        _, running = on_a_free_port(start)
        yield running
        running.stop()


def client() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def login_form(session: requests.Session, gate: ApprovalGate) -> str:
    page = session.get(f"{gate.admin}/console/login", timeout=10)
    assert page.status_code == 200
    found = re.search(r'name="nonce" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def token(gate: ApprovalGate, who: str = "alice") -> str:
    return gate.token_files[who].read_text().strip()


def logged_in(gate: ApprovalGate, who: str = "alice") -> tuple[requests.Session, str]:
    """A session logged in through the form, and its CSRF token."""
    session = client()
    nonce = login_form(session, gate)
    answer = session.post(f"{gate.admin}/console/login", data={"nonce": nonce, "token": token(gate, who)},
                          allow_redirects=False, timeout=10)  # fmt: skip
    assert answer.status_code == 303 and answer.headers["Location"] == "/console/pending"
    page = session.get(f"{gate.admin}/console/pending", timeout=10)
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return session, found.group(1)


def test_the_login_form_refuses_posts_it_did_not_serve(gate: ApprovalGate) -> None:
    url = f"{gate.admin}/console/login"
    good = token(gate)
    session = client()

    def post(nonce: str | None, **extra: object) -> requests.Response:
        data = {"token": good} if nonce is None else {"token": good, "nonce": nonce}
        return session.post(url, data=data, allow_redirects=False, timeout=10, **extra)  # type: ignore[arg-type]

    refused: list[requests.Response] = []
    login_form(session, gate)
    refused.append(post(None))  # no nonce
    refused.append(post(login_form(session, gate) + "x"))  # another nonce
    nonce = login_form(session, gate)
    refused.append(client().post(url, data={"token": good, "nonce": nonce}, allow_redirects=False,
                                 timeout=10))  # the nonce without its cookie  # fmt: skip
    refused.append(post(login_form(session, gate), headers={"Sec-Fetch-Site": "cross-site"}))
    refused.append(post(login_form(session, gate), headers={"Origin": "http://evil.example"}))
    refused.append(post(login_form(session, gate) + "\u00e9"))  # not ASCII: refused, no error page
    for answer in refused:
        assert answer.status_code == 403 and "login form expired" in answer.text
        assert "session" not in answer.headers.get("Set-Cookie", "")
    wrong = session.post(url, data={"token": good[:-2], "nonce": login_form(session, gate)},
                         allow_redirects=False, timeout=10)  # fmt: skip
    assert wrong.status_code == 401 and "Wrong token" in wrong.text
    assert "session" not in wrong.headers.get("Set-Cookie", "")
    right = post(login_form(session, gate))
    assert right.status_code == 303
    cookie = right.headers["Set-Cookie"]
    assert re.search(r"egress_session=[\w-]{40,}; HttpOnly; Path=/; SameSite=Strict", cookie)
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back


def test_answers_need_the_session_its_csrf_token_and_a_same_site_request(
    gate: ApprovalGate,
) -> None:
    session, csrf = logged_in(gate)
    url = f"{gate.admin}/console/approvals/{MISSING}/approve"
    body = {"scope": "once"}
    assert session.post(url, json=body, timeout=10).status_code == 403
    assert (
        session.post(url, json=body, headers={"X-CSRF-Token": csrf[:-1]}, timeout=10).status_code
        == 403
    )
    for cross in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                  {"Origin": "http://evil.example"}):  # fmt: skip
        answer = session.post(url, json=body, headers={"X-CSRF-Token": csrf, **cross}, timeout=10)
        assert answer.status_code == 403, cross
    _, other = logged_in(gate, "bob")  # another session's token is no good either
    assert (
        session.post(url, json=body, headers={"X-CSRF-Token": other}, timeout=10).status_code == 403
    )
    # The bearer token answers through /v1 only; the console wants its session.
    bearer = {"Authorization": f"Bearer {token(gate)}", "X-CSRF-Token": csrf}
    assert client().post(url, json=body, headers=bearer, timeout=10).status_code == 401
    # With everything in place the answer reaches the broker (which knows no such approval).
    found = session.post(url, json=body, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert found.status_code == 404 and found.json() == {"error": f"no approval {MISSING}"}
    form = session.post(url, data={"_csrf": csrf}, timeout=10)  # the form field passes the check,
    assert form.status_code == 400  # then the answer itself wants JSON


def test_the_api_takes_bearer_tokens_only(gate: ApprovalGate) -> None:
    session, _ = logged_in(gate)
    whoami = f"{gate.admin}/v1/whoami"
    assert session.get(whoami, timeout=10).status_code == 401
    answer = session.get(whoami, headers={"Authorization": f"Bearer {token(gate)}"}, timeout=10)
    assert answer.json() == {"name": "alice"}


def test_logout_needs_the_csrf_token_and_ends_the_session_and_its_streams(
    gate: ApprovalGate,
) -> None:
    session, csrf = logged_in(gate)
    stream = session.get(f"{gate.admin}/console/events", stream=True, timeout=(5, 30))
    assert stream.status_code == 200
    lines = stream.iter_lines(decode_unicode=True)
    assert next(lines) == "id: 1" and next(lines) == "event: snapshot"

    refused = session.post(f"{gate.admin}/console/logout", allow_redirects=False, timeout=10)
    assert refused.status_code == 403
    assert session.get(f"{gate.admin}/console/policy", timeout=10).status_code == 200
    out = session.post(f"{gate.admin}/console/logout", data={"_csrf": csrf},
                       allow_redirects=False, timeout=10)  # fmt: skip
    assert out.status_code == 303 and out.headers["Location"] == "/console/login"
    rest = list(lines)  # the stream ends at once (the read timeout would fail this)
    assert all(not str(line).startswith("event:") for line in rest)
    page = session.get(f"{gate.admin}/console/pending", allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["Location"] == "/console/login"
    events = session.get(f"{gate.admin}/console/events", timeout=10)
    assert events.status_code == 401


def test_pages_and_assets_carry_the_security_headers(gate: ApprovalGate) -> None:
    session, _ = logged_in(gate)
    page = session.get(f"{gate.admin}/console/pending", timeout=10)
    assets = re.findall(r'(?:src|href)="(/console/static/[^"]+)"', page.text)
    assert len(assets) == 3  # the script, the stylesheet, the icon
    for url in ["/", "/console/login", *assets]:
        answer = client().get(f"{gate.admin}{url}", timeout=10)
        assert answer.status_code == 200, url
        headers = answer.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert "Server" not in headers
    types = {url.split("?")[0].rsplit(".", 1)[1]: client().get(f"{gate.admin}{url}", timeout=10)
             .headers["Content-Type"] for url in assets}  # fmt: skip
    assert types == {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    outside = client().get(f"{gate.admin}/console/static/%2e%2e/handlers.py", timeout=10)
    assert outside.status_code in (403, 404) and "import" not in outside.text


def test_a_sandbox_cannot_reach_the_console_through_the_gate(gate: ApprovalGate) -> None:
    host, port = gate.admin.removeprefix("http://").split(":")
    for path in ("/console/login", "/console/pending", "/console/static/console.js"):
        result = curl(f"http://{host}:{port}{path}", gate.proxy)
        assert result.status == 403, path
        assert result.headers["x-egress-reason"] in ("internal-address", "no-matching-rule")


def test_cookies_are_secure_when_people_reach_the_console_over_https(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: none\n    hosts: [none.test]\n")
    with FakeDns() as dns:
        port, tls_fronted = on_a_free_port(
            lambda port: ApprovalGate(policy, dns.nameserver, tmp_path,
                                      "--admin-url", "https://egress-admin.test", admin_port=port)
        )  # fmt: skip
        admin = f"http://127.0.0.1:{port}"  # what a TLS proxy in front of it would reach
        try:
            session = client()
            page = session.get(f"{admin}/console/login", timeout=10)
            assert "Secure" in page.headers["Set-Cookie"]
            nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
            assert nonce
            # requests keeps Secure cookies for https only: send the login cookie by hand.
            answer = client().post(
                f"{admin}/console/login",
                data={"nonce": nonce.group(1), "token": token(tls_fronted)},
                cookies={"egress_login": nonce.group(1)},
                allow_redirects=False,
                timeout=10,
            )
            assert answer.status_code == 303
            assert re.search(
                r"__Host-egress_session=[\w-]{40,}; HttpOnly; Path=/; SameSite=Strict; Secure",
                answer.headers["Set-Cookie"],
            )
        finally:
            tls_fronted.stop()


def test_every_console_file_is_package_data() -> None:
    """``pip install .`` (and so the image) carries only files that pyproject names."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["proxy.approvals.console"]
    files = [p.relative_to(HERE).as_posix() for p in HERE.rglob("*")
             if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]  # fmt: skip
    assert len(files) >= 8
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []


def test_the_policy_page_shows_the_last_reload(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: old\n    hosts: [old.test]\n")
    with FakeDns() as dns:
        running = ApprovalGate(policy, dns.nameserver, tmp_path)
        try:
            session, _ = logged_in(running)
            page = session.get(f"{running.admin}/console/policy", timeout=10).text
            assert "No reload since this gate started" in page
            version = re.search(r'id="policy-version">(\w+)<', page)
            assert version
            policy.write_text("version: 1\nrules:\n  - name: new-<b>\n    hosts: [new.test]\n")
            running.serve.proc.send_signal(signal.SIGHUP)
            running.serve.wait_for_line("policy reload failed")
            page = session.get(f"{running.admin}/console/policy", timeout=10).text
            assert re.search(
                rf"failed; version <span class=\"mono\">{version.group(1)}</span> stays", page
            )
            policy.write_text("version: 1\nrules:\n  - name: new\n    hosts: [new.test]\n")
            running.serve.proc.send_signal(signal.SIGHUP)
            running.serve.wait_for_line("policy reloaded")
            page = session.get(f"{running.admin}/console/policy", timeout=10).text
            added = re.search(r"Added: (.*)</li>", page)
            removed = re.search(r"Removed: (.*)</li>", page)
            assert added and ">new<" in added.group(1)
            assert removed and ">old<" in removed.group(1)
            api = session.get(f"{running.admin}/v1/policy", timeout=10,
                              headers={"Authorization": f"Bearer {token(running)}"}).json()  # fmt: skip
            assert api["reload"]["ok"] is True
            assert (api["reload"]["added"], api["reload"]["removed"]) == (["new"], ["old"])
            assert api["reload"]["to_version"] == api["version"]
        finally:
            running.stop()
