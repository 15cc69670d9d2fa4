"""``egress serve`` picks up policy edits by itself: an editor's atomic rename, a Kubernetes ConfigMap
``..data`` symlink swap, an in-place append; a broken or deleted file keeps the last good policy and is
reported in the log, the decision stream, the metrics and ``/healthz``."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import waited_for, written_lines
from tests.proxy.app.test_serve import Serve, status

ONE = "version: 1\nrules:\n  - name: pkgs\n    hosts: [pkgs.test]\n"
TWO = ONE + "  - name: more\n    hosts: [more.test]\n"
BROKEN = ONE + "  - name: wide\n    hosts: ['*.com']\n"


def records(log: Path) -> list[dict[str, Any]]:
    """What the running gate has written to ``log`` so far (polled while it writes)."""
    return [json.loads(line) for line in written_lines(log) if line.strip()]


def reloads(log: Path) -> list[dict[str, Any]]:
    return [r for r in records(log) if r.get("event") == "egress.policy.reload"]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """A reload's evidence, given the watcher's interval and a loaded machine."""
    waited_for(predicate, what, timeout)


def reason_for(serve: Serve, log: Path, host: str) -> str:
    before = len(records(log))
    status(serve.port, f"http://{host}/")
    fresh = [r for r in records(log)[before:] if r.get("event") == "egress.decision"]
    return str(fresh[0]["reason"])


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metrics_address(serve: Serve) -> str:
    serve.wait_for_line("metrics on http://")
    line = next(line for line in serve.lines if "metrics on http://" in line)
    return line.split("metrics on http://", 1)[1].split("/metrics")[0].strip()


def get(url: str) -> tuple[int, str]:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Serve, Path, Path]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(ONE)
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--decision-log", str(log), "--nameserver", "127.0.0.1:9",
        "--metrics", "127.0.0.1:0", "--watch-interval", "0.1", metrics=True,
    )  # fmt: skip
    try:
        yield serve, policy, log
    finally:
        serve.stop()


def test_an_editors_rename_is_reloaded_and_reported_with_what_changed(
    gate: tuple[Serve, Path, Path],
) -> None:
    serve, policy, log = gate
    assert reason_for(serve, log, "more.test") == "no-matching-rule"
    atomic_write(policy, TWO)
    wait_for(lambda: len(reloads(log)) == 1, "the reload event")
    (event,) = reloads(log)
    assert event["result"] == "ok" and event["trigger"] == "file-change"
    assert event["rules_added"] == ["more"] and event["hosts_added"] == ["more.test"]
    assert event["rules_removed"] == [] and event["hosts_removed"] == []
    assert event["policy_version"] != event["from_version"]
    assert reason_for(serve, log, "more.test") != "no-matching-rule"
    decision = [r for r in records(log) if r.get("event") == "egress.decision"][-1]
    assert decision["policy_version"] == event["policy_version"]


def test_a_broken_edit_keeps_the_last_good_policy_and_says_so_everywhere(
    gate: tuple[Serve, Path, Path],
) -> None:
    serve, policy, log = gate
    metrics = metrics_address(serve)
    assert get(f"http://{metrics}/healthz")[0] == 200
    atomic_write(policy, BROKEN)
    wait_for(lambda: len(reloads(log)) == 1, "the refused reload event")
    (event,) = reloads(log)
    assert event["result"] == "error"
    assert any("policy.yaml:6: rule 'wide': key 'hosts'" in p for p in event["problems"])
    serve.wait_for_line("policy reload rejected: ")
    assert any("policy.yaml:6: rule 'wide'" in line for line in serve.lines)
    code, body = get(f"http://{metrics}/healthz")
    health = json.loads(body)
    assert code == 200 and health["status"] == "stale"
    assert health["stale"][0]["version_in_force"] == event["policy_version"]
    assert get(f"http://{metrics}/healthz?strict")[0] == 503
    _, exposition = get(f"http://{metrics}/metrics")
    assert "egress_policy_reload_failures_total 1.0" in exposition
    assert "egress_policy_stale 1.0" in exposition
    # still the last good policy: pkgs allowed, anything under .com refused
    assert reason_for(serve, log, "x.com") == "no-matching-rule"
    # fixing the file clears the stale state
    atomic_write(policy, TWO)
    wait_for(lambda: len(reloads(log)) == 2, "the good reload")
    assert reloads(log)[1]["result"] == "ok"
    assert json.loads(get(f"http://{metrics}/healthz")[1])["status"] == "ok"


def test_a_deleted_policy_file_keeps_the_last_good_policy(gate: tuple[Serve, Path, Path]) -> None:
    serve, policy, log = gate
    policy.unlink()
    wait_for(lambda: len(reloads(log)) == 1, "the refused reload")
    (event,) = reloads(log)
    assert event["result"] == "error" and "cannot read" in " ".join(event["problems"])
    assert reason_for(serve, log, "more.test") == "no-matching-rule"
    assert reason_for(serve, log, "pkgs.test") != "no-matching-rule"
    atomic_write(policy, TWO)
    wait_for(lambda: len(reloads(log)) == 2, "the reload once the file is back")
    assert reloads(log)[1]["result"] == "ok"


def test_a_configmap_symlink_swap_and_an_include_edit_are_reloaded(tmp_path: Path) -> None:
    """The kubelet's layout: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>/."""
    mount = tmp_path / "mount"
    first = mount / "..2026_01"
    first.mkdir(parents=True)
    (first / "policy.yaml").write_text("version: 1\ninclude: [extra.yaml]\nrules: []\n")
    (first / "extra.yaml").write_text(ONE)
    (mount / "..data").symlink_to("..2026_01")
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(mount / "policy.yaml"), "--decision-log", str(log),
        "--nameserver", "127.0.0.1:9", "--watch-interval", "0.1",
    )  # fmt: skip
    try:
        second = mount / "..2026_02"
        second.mkdir()
        (second / "policy.yaml").write_text("version: 1\ninclude: [extra.yaml]\nrules: []\n")
        (second / "extra.yaml").write_text(TWO)
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to("..2026_02")
        os.replace(tmp_link, mount / "..data")
        for name in ("policy.yaml", "extra.yaml"):
            (first / name).unlink()
        first.rmdir()
        wait_for(lambda: len(reloads(log)) == 1, "the reload after the swap")
        assert reloads(log)[0]["result"] == "ok"
        assert reloads(log)[0]["rules_added"] == ["more"]
        # an in-place edit of the include (now the new directory's) is seen too
        with (second / "extra.yaml").open("a") as f:
            f.write("  - name: third\n    hosts: [third.test]\n")
        wait_for(lambda: len(reloads(log)) == 2, "the reload after the include edit")
        assert reloads(log)[1]["rules_added"] == ["third"]
    finally:
        serve.stop()


def test_an_include_symlink_re_pointed_at_a_narrower_file_is_reloaded(tmp_path: Path) -> None:
    """``ln -sfn`` of an included file's symlink (switching a team's profile, a release link)
    changes what the next load reads though neither the top file nor the file loaded before
    changed: the narrower policy must take effect, not wait for an unrelated edit or a SIGHUP."""
    (tmp_path / "two.yaml").write_text(TWO)
    (tmp_path / "one.yaml").write_text(ONE)
    (tmp_path / "team.yaml").symlink_to("two.yaml")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ninclude: [team.yaml]\nrules: []\n")
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--decision-log", str(log), "--nameserver", "127.0.0.1:9",
        "--watch-interval", "0.1",
    )  # fmt: skip
    try:
        assert reason_for(serve, log, "more.test") != "no-matching-rule"
        tmp_link = tmp_path / "team.yaml.tmp"
        tmp_link.symlink_to("one.yaml")
        os.replace(tmp_link, tmp_path / "team.yaml")
        wait_for(lambda: len(reloads(log)) == 1, "the reload after the include was re-pointed")
        assert reloads(log)[0]["result"] == "ok"
        assert reloads(log)[0]["rules_removed"] == ["more"]
        assert reason_for(serve, log, "more.test") == "no-matching-rule"
    finally:
        serve.stop()


def test_sighup_still_reloads_without_watching(tmp_path: Path) -> None:
    import signal

    policy = tmp_path / "policy.yaml"
    policy.write_text(ONE)
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--decision-log", str(log), "--nameserver", "127.0.0.1:9",
        "--watch-interval", "0",
    )  # fmt: skip
    try:
        policy.write_text(TWO)
        time.sleep(0.5)  # no watcher: nothing may happen by itself
        assert reloads(log) == []
        serve.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(reloads(log)) == 1, "the SIGHUP reload")
        assert reloads(log)[0]["trigger"] == "signal"
    finally:
        serve.stop()


def test_a_watched_reload_cannot_widen_past_the_managed_ceiling(tmp_path: Path) -> None:
    managed = tmp_path / "org.yaml"
    managed.write_text("version: 1\nrules:\n  - name: org\n    hosts: [pkgs.test, more.test]\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(ONE)
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--decision-log", str(log), "--nameserver", "127.0.0.1:9",
        "--managed-policy", str(managed), "--watch-interval", "0.1",
    )  # fmt: skip
    try:
        atomic_write(policy, ONE + "  - name: wide\n    hosts: [evil.example]\n")
        wait_for(lambda: len(reloads(log)) == 1, "the refused reload")
        (event,) = reloads(log)
        assert event["result"] == "error"
        assert any(
            "rule 'wide'" in p and "outside the managed ceiling" in p for p in event["problems"]
        )
        assert reason_for(serve, log, "evil.example") == "no-matching-rule"
        # the organisation narrows its ceiling below the local policy: refused too
        atomic_write(policy, ONE)
        wait_for(lambda: len(reloads(log)) == 2, "the good reload")
        atomic_write(managed, "version: 1\nrules:\n  - name: org\n    hosts: [other.test]\n")
        wait_for(lambda: len(reloads(log)) == 3, "the refused ceiling change")
        assert reloads(log)[2]["result"] == "error"
        assert reason_for(serve, log, "pkgs.test") != "no-matching-rule"
    finally:
        serve.stop()


def test_the_admin_listener_serves_healthz_too(tmp_path: Path) -> None:
    from tests.approvals_harness import ApprovalGate

    policy = tmp_path / "policy.yaml"
    policy.write_text(ONE)
    gate = ApprovalGate(policy, "127.0.0.1:9", tmp_path, "--watch-interval", "0.1")
    try:
        base = gate.admin.rstrip("/")
        code, body = get(f"{base}/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        atomic_write(policy, BROKEN)
        wait_for(lambda: json.loads(get(f"{base}/healthz")[1])["status"] == "stale", "stale")
        health = json.loads(get(f"{base}/healthz")[1])
        assert any("rule 'wide'" in p for p in health["problems"])
        assert get(f"{base}/healthz?strict")[0] == 503
    finally:
        gate.stop()


def test_reloads_appear_on_the_admin_event_stream(tmp_path: Path) -> None:
    import requests

    from tests.approvals_harness import ApprovalGate

    policy = tmp_path / "policy.yaml"
    policy.write_text(ONE)
    gate = ApprovalGate(policy, "127.0.0.1:9", tmp_path, "--watch-interval", "0.1")
    session = requests.Session()
    session.trust_env = False
    try:
        stream = gate.event_stream(session)
        lines = stream.iter_lines(decode_unicode=True)
        kind = ""
        for line in lines:  # the snapshot: the stream is subscribed from here on
            if line.startswith("data:"):
                break
        atomic_write(policy, BROKEN)
        seen: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "policy":
                seen.append(json.loads(line.split(":", 1)[1]))
                break
        stream.close()
        assert seen and seen[0]["result"] == "error"
        assert any("rule 'wide'" in p for p in seen[0]["problems"])
    finally:
        session.close()
        gate.stop()
