"""The approvals console in a real browser: headless Chromium (Debian's) on a real ``egress serve``.

Requests are real curl through the gate, held by ask rules and counted by the upstream; answers are
clicks. Markup a sandbox chose (a path, a DNS name) must show as text and run nothing. Screenshots of
every page are kept as test artefacts (``$EGRESS_TEST_ARTEFACTS``, else a pytest temporary directory).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.query
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests import browser
from tests.approvals_harness import ApprovalGate, fetch
from tests.dnsfake import FakeDns
from tests.harness import Upstream, curl

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: ask-api
    action: ask
    hosts: [api.test]
    ports: [{port}]
    timeout: 120
  - name: ask-push
    action: ask
    description: pushes wait for a person
    hosts: [repo.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/**"]
    timeout: 120
  - name: never
    action: deny
    hosts: [blocked.test]
"""
# Markup in places a sandbox controls: a request path (held for an approval) and DNS names (decisions).
# Each payload would set window.pwned if it ever ran.
PATH_MARKUP = "/x/<script>window.pwned=1</script>/<img/src=x/onerror=window.pwned=2>"
NAME_MARKUP = ("<img/src=x/onerror=window.pwned=3>.test", "<script>window.pwned=4</script>.test")


@dataclass
class Console:
    gate: ApprovalGate
    upstream: Upstream
    driver: webdriver.Chrome
    dns_port: int
    shots: Path

    def token(self, who: str = "alice") -> str:
        return self.gate.token_files[who].read_text().strip()

    def url(self, page: str) -> str:
        return f"{self.gate.admin}/console/{page}"

    def login(self, who: str = "alice") -> None:
        self.driver.get(self.url("login"))
        self.driver.find_element(By.ID, "token").send_keys(self.token(who))
        self.driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
        browser.wait_for(self.driver, lambda d: d.current_url == self.url("pending"))

    def open(self, page: str) -> None:
        """Open a live page and wait until its event stream is connected."""
        self.driver.get(self.url(page))
        self.driver.execute_script("window.stillHere = true;")
        browser.wait_for(
            self.driver,
            lambda d: d.find_element(By.ID, "stream").get_attribute("data-state") == "live",
            message="the event stream did not connect",
        )

    def not_reloaded(self) -> bool:
        return self.driver.execute_script("return window.stillHere === true;") is True

    def approval(self, text: str) -> WebElement:
        """The pending approval whose title contains ``text``, once it is shown."""

        def shown(d: webdriver.Chrome) -> WebElement | bool:
            for item in d.find_elements(By.CSS_SELECTOR, "#approvals > li"):
                if text in item.find_element(By.CSS_SELECTOR, "h2").text:
                    return item
            return False

        found: WebElement = browser.wait_for(self.driver, shown, message=f"no approval for {text}")
        return found

    def gone(self, approval_id: str) -> None:
        browser.wait_for(
            self.driver,
            lambda d: not d.find_elements(By.ID, f"approval-{approval_id}"),
            message=f"approval {approval_id} is still shown",
        )

    def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def in_page_post(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> int:
        """A POST from the logged-in page itself (its cookie, its origin): the status it gets."""
        status = self.driver.execute_async_script(
            """
            const [path, headers, body, done] = arguments;
            fetch(path, {method: "POST", headers: Object.assign({"Content-Type": "application/json"},
                  headers), body: JSON.stringify(body), credentials: "same-origin"})
              .then((r) => done(r.status), () => done(-1));
            """,
            path,
            headers,
            body,
        )
        assert isinstance(status, int)
        return status

    def csrf(self) -> str:
        value = self.driver.find_element(By.CSS_SELECTOR, 'meta[name="csrf-token"]')
        token = value.get_attribute("content")
        assert token
        return token

    def console_errors(self) -> list[str]:
        return [
            str(e["message"])
            for e in self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            if e.get("level") == "SEVERE"
        ]


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("EGRESS_TEST_ARTEFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def console(
    tmp_path: Path, fake_dns: FakeDns, http_upstream: Upstream, shots: Path
) -> Iterator[Console]:
    why = browser.missing()
    if why is not None:
        pytest.fail(why)
    for name in ("api.test", "repo.test", "blocked.test"):
        fake_dns.set(name, "A", ["127.0.0.1"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port))
    directory = tmp_path / "gate"
    directory.mkdir()
    gate = ApprovalGate(policy, fake_dns.nameserver, directory, "--dns-listen", "127.0.0.1:0")
    dns_port = int(gate.serve.info["dns"].rsplit(":", 1)[1])
    try:
        with browser.chromium(tmp_path / "chromedriver.log") as driver:
            yield Console(gate, http_upstream, driver, dns_port, shots)
    finally:
        gate.stop()


def api(console: Console, path: str = "/x") -> str:
    return f"http://api.test:{console.upstream.port}{path}"


def dns_query(console: Console, text: str) -> None:
    name = dns.name.Name([label.encode() for label in text.split(".")] + [b""])
    dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=console.dns_port, timeout=5)


# -- logging in ---------------------------------------------------------------------------------


def test_a_wrong_token_cannot_log_in_and_the_right_one_can(console: Console) -> None:
    driver = console.driver
    driver.get(console.url("pending"))
    browser.wait_for(driver, lambda d: d.current_url == console.url("login"))
    console.shot("login")
    driver.find_element(By.ID, "token").send_keys("not-a-token-" + console.token()[:8])
    driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    error = browser.wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[role=alert]"))
    assert "Wrong token" in error[0].text
    assert driver.current_url == console.url("login")
    assert not [c for c in driver.get_cookies() if "session" in c["name"]]
    driver.get(console.url("pending"))
    assert driver.current_url == console.url("login")  # still nobody

    console.login("bob")
    assert driver.find_element(By.ID, "who").text == "bob"
    [cookie] = [c for c in driver.get_cookies() if "session" in c["name"]]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http on loopback: no TLS on the admin listener

    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    browser.wait_for(driver, lambda d: d.current_url == console.url("login"))
    driver.add_cookie({"name": cookie["name"], "value": cookie["value"], "path": "/"})
    driver.get(console.url("pending"))
    assert driver.current_url == console.url("login")  # the old session id is worth nothing


# -- answering ----------------------------------------------------------------------------------


def test_a_held_request_shows_up_live_allow_once_lets_it_through_and_deny_refuses_the_next(
    console: Console,
) -> None:
    console.login()
    console.open("pending")
    assert console.driver.find_element(By.ID, "empty").is_displayed()

    held = fetch(api(console, "/first"), console.gate.proxy)
    item = console.approval(f"api.test:{console.upstream.port}")
    assert console.not_reloaded()
    facts = item.find_element(By.CSS_SELECTOR, "dl").text
    assert "ask-api" in facts and "api.test" in facts and "Time left" in facts
    [pending] = console.gate.pending()
    assert item.get_attribute("id") == f"approval-{pending['id']}"
    assert not held.done and console.upstream.accepted == 0
    console.shot("pending")

    item.find_element(By.CSS_SELECTOR, "button[data-answer=once]").click()
    result = held.result()
    assert result.status == 200 and "GET /first" in result.body
    assert console.upstream.accepted == 1
    console.gone(pending["id"])
    assert console.not_reloaded()

    second = fetch(api(console, "/second"), console.gate.proxy)
    item = console.approval(f"api.test:{console.upstream.port}")
    [again] = console.gate.pending()
    assert again["id"] != pending["id"]
    deny = item.find_element(By.CSS_SELECTOR, "button[data-answer=deny]")
    deny.click()  # no reason yet: the page asks for one and sends nothing
    assert "Say why" in item.find_element(By.CSS_SELECTOR, ".result").text
    assert [p["id"] for p in console.gate.pending()] == [again["id"]]
    item.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("not for this task")
    deny.click()
    refused = second.result()
    assert refused.status == 403 and refused.headers["x-egress-reason"] == "approval-denied"
    assert "denied by alice: not for this task" in refused.body
    assert console.upstream.accepted == 1  # the denied request reached nothing
    console.gone(again["id"])

    outcomes = [
        (d["reason"], d.get("decided_by"), d.get("grant"))
        for d in console.gate.decisions()
        if d["reason"] != "approval-pending"
    ]
    assert outcomes == [("approval-granted", "alice", "once"), ("approval-denied", "alice", None)]
    assert console.console_errors() == []


def test_an_answer_without_the_csrf_token_is_refused_and_grants_nothing(console: Console) -> None:
    console.login()
    console.open("pending")
    held = fetch(api(console), console.gate.proxy)
    console.approval("api.test")
    [pending] = console.gate.pending()
    path = f"/console/approvals/{pending['id']}/approve"
    assert console.in_page_post(path, {}, {"scope": "persist"}) == 403
    assert console.in_page_post(path, {"X-CSRF-Token": "wrong"}, {"scope": "persist"}) == 403
    other = console.csrf()
    console.driver.delete_all_cookies()  # a valid token without its session is worth nothing
    assert console.in_page_post(path, {"X-CSRF-Token": other}, {"scope": "once"}) == 401
    assert [p["id"] for p in console.gate.pending()] == [pending["id"]]  # still waiting
    assert not held.done and console.upstream.accepted == 0
    assert console.gate.egress("deny", pending["id"]).returncode == 0
    assert held.result().status == 403
    assert console.upstream.accepted == 0
    assert not (console.gate.directory / "state" / "approved.yaml").exists()


# -- data from sandboxes is text ------------------------------------------------------------------


def no_injection(console: Console) -> None:
    driver = console.driver
    assert driver.execute_script("return window.pwned === undefined;") is True
    scripts = driver.find_elements(By.TAG_NAME, "script")
    assert [s.get_attribute("src") for s in scripts if not s.get_attribute("src")] == []
    assert len(scripts) == 1
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.find_elements(By.CSS_SELECTOR, "[onerror], [onload]") == []


def test_markup_in_a_held_path_is_shown_as_text(console: Console) -> None:
    console.login()
    console.open("pending")
    held = fetch(f"http://repo.test:{console.upstream.port}{PATH_MARKUP}", console.gate.proxy,
                 "-X", "POST")  # fmt: skip
    item = console.approval(PATH_MARKUP)
    heading = item.find_element(By.CSS_SELECTOR, "h2").text
    shown = f"POST repo.test:{console.upstream.port}{PATH_MARKUP}"
    assert re.fullmatch(re.escape(shown) + r" \(header fields of \d+ bytes\)", heading), heading
    facts = item.find_element(By.CSS_SELECTOR, "dl").text
    assert PATH_MARKUP in facts
    assert re.search(r"Header fields\s+\d+ bytes \(not shown\)", facts), facts
    no_injection(console)
    console.shot("pending-markup")
    item.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("<b>no</b>")
    item.find_element(By.CSS_SELECTOR, "button[data-answer=deny]").click()
    refused = held.result()
    assert refused.status == 403 and console.upstream.accepted == 0
    no_injection(console)


def test_markup_in_a_host_name_is_shown_as_text_on_the_decisions_page(console: Console) -> None:
    console.login()
    console.open("decisions")
    for name in NAME_MARKUP:
        dns_query(console, name)

    def rows(d: webdriver.Chrome) -> list[str] | bool:
        texts = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#decisions tr")]
        return texts if all(any(n in t for t in texts) for n in NAME_MARKUP) else False

    texts = browser.wait_for(console.driver, rows, message="the decisions did not show up")
    assert all("invalid-host" in t for t in texts)
    assert console.not_reloaded()
    no_injection(console)
    assert console.console_errors() == []


# -- live decisions ------------------------------------------------------------------------------


def test_decisions_can_be_filtered_and_paused_without_losing_any(console: Console) -> None:
    console.login()
    console.open("decisions")
    driver = console.driver
    proxy = console.gate.proxy
    assert curl(f"http://blocked.test:{console.upstream.port}/a", proxy).status == 403

    def shown(d: webdriver.Chrome) -> list[str]:
        return [r.text for r in d.find_elements(By.CSS_SELECTOR, "#decisions tr")]

    browser.wait_for(driver, lambda d: any("blocked.test" in t for t in shown(d)))
    pause = driver.find_element(By.ID, "pause")
    pause.click()
    assert pause.get_attribute("aria-pressed") == "true"
    for path in ("/b", "/c", "/d"):
        assert curl(f"http://nowhere.test:{console.upstream.port}{path}", proxy).status == 403
    browser.wait_for(
        driver,
        lambda d: "3 new" in d.find_element(By.ID, "buffered").text,
        message="the paused page did not count what it buffered",
    )
    assert not any("nowhere.test" in t for t in shown(driver))  # held back while paused
    pause.click()
    browser.wait_for(driver, lambda d: sum("nowhere.test" in t for t in shown(d)) == 3)

    driver.find_element(By.CSS_SELECTOR, "#filters input[name=host]").send_keys("blocked")
    browser.wait_for(driver, lambda d: all("blocked.test" in t for t in shown(d)))
    assert len(shown(driver)) == 1
    driver.find_element(By.CSS_SELECTOR, "#filters input[name=host]").clear()
    driver.find_element(By.CSS_SELECTOR, "#filters input[name=reason]").send_keys("no-matching")
    browser.wait_for(driver, lambda d: len(shown(d)) == 3)
    assert all("no-matching-rule" in t for t in shown(driver))
    console.shot("decisions")


# -- the read-only pages, headers, no inline script ------------------------------------------------


def test_every_page_has_a_strict_csp_and_no_inline_script(console: Console) -> None:
    assert curl(f"http://blocked.test:{console.upstream.port}/", console.gate.proxy).status == 403
    console.login()
    cookies = {c["name"]: c["value"] for c in console.driver.get_cookies()}
    session = requests.Session()
    session.trust_env = False
    for page in ("login", "pending", "decisions", "sandboxes", "policy"):
        response = session.get(console.url(page), cookies=cookies, timeout=10)
        assert response.status_code == 200, page
        csp = response.headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
            assert directive in csp, (page, directive)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cache-Control"] == "no-store"
        assert "<script>" not in response.text
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", response.text), page  # no handler attributes

        console.driver.get(console.url(page))
        scripts = console.driver.find_elements(By.TAG_NAME, "script")
        if page != "login":  # logged in: the login page sends people on to pending
            assert all(s.get_attribute("src") for s in scripts), page
            assert console.driver.find_elements(By.CSS_SELECTOR, "[style], style") == []
            if page in ("sandboxes", "policy"):  # the live pages are shot with data elsewhere
                console.shot(page)
    assert console.console_errors() == []

    console.driver.get(console.url("sandboxes"))
    [row] = console.driver.find_elements(By.CSS_SELECTOR, "table.sandboxes tbody tr")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:4] == ["- (no sandbox identities)", "0", "1", "0"]  # one refused request
    console.driver.get(console.url("policy"))
    rules = console.driver.find_element(By.CSS_SELECTOR, "table.rules").text
    assert "ask-push" in rules and "POST /**" in rules and "pushes wait for a person" in rules
    version = console.driver.find_element(By.ID, "policy-version").text
    api_policy = session.get(
        f"{console.gate.admin}/v1/policy",
        headers={"Authorization": f"Bearer {console.token()}"},
        timeout=10,
    ).json()
    assert version == api_policy["version"]
    assert json.dumps(api_policy["reload"]) == "null"
