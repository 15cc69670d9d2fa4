"""``egress serve`` as a real process: readiness, DNS gate, SIGHUP reload (good and broken), SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.dnsfake import FakeDns
from tests.harness import WAIT, LoopbackServer, clean_env, terminate, wait_until, waited_for

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"

POLICY = """\
version: 1
rules:
  - name: pkgs
    hosts: [pkgs.test]
"""


class Serve:
    """``egress serve`` on a port it picks itself, ready once it says so (its "gate ready" line):
    never a probe connection, which to a port nobody listens on yet can connect to itself.
    ``wrapper`` runs it under another command (``prlimit ...``)."""

    def __init__(self, *args: str, metrics: bool = False, wrapper: Sequence[str] = ()) -> None:
        quiet = [] if metrics else ["--no-metrics"]
        self.proc = subprocess.Popen(
            [*wrapper, EGRESS, "serve", "--listen", "127.0.0.1:0", *quiet, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.info: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(30) or not self.info:
            self.stop()
            raise AssertionError("egress serve did not become ready:\n" + "".join(self.lines))

    def _read(self) -> None:
        """Until the gate's stderr ends; ``ready`` is also set then (a gate that exited at its
        start is not waited for: ``info`` stays empty)."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "gate ready" in line:
                self.info = dict(
                    part.split("=", 1)
                    for part in line.split("gate ready", 1)[1].split()
                    if "=" in part
                )
                self.ready.set()
        self.ready.set()

    @property
    def port(self) -> int:
        return int(self.info["listen"].rsplit(":", 1)[1])

    def wait_for_line(self, text: str, timeout: float = 15) -> None:
        if not wait_until(lambda: any(text in line for line in self.lines), timeout):
            raise AssertionError(f"no log line containing {text!r}:\n" + "".join(self.lines))

    def stop(self) -> int:
        return terminate(self.proc)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def fake() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.set("pkgs.test", "A", ["203.0.113.7"])
        server.set("other.test", "A", ["203.0.113.8"])
        yield server


def status(port: int, url: str) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", f"http://127.0.0.1:{port}",
         "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True, text=True, timeout=20, env=clean_env(),
    )  # fmt: skip
    return result.stdout


def ask_dns(
    serve: Serve, name: str, rdtype: str = "A", *, tcp: bool = False
) -> dns.message.Message:
    """One question to the gate's ``--dns-listen`` listener, and its answer."""
    host, port = serve.info["dns"].rsplit(":", 1)
    query = dns.query.tcp if tcp else dns.query.udp
    return query(dns.message.make_query(name, rdtype), host, port=int(port), timeout=5)


def test_serve_decides_logs_and_stops_cleanly_on_sigterm(policy: Path, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--decision-log", str(log), "--nameserver", "127.0.0.1:9"
    )
    try:
        assert status(serve.port, "http://denied.example/") == "403"
    finally:
        assert serve.stop() == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r.get("event") == "egress.decision"]
    assert [(r["host"], r["reason"]) for r in decisions] == [("denied.example", "no-matching-rule")]


def test_dns_listener_answers_allowed_names_and_leaks_nothing(policy: Path, fake: FakeDns) -> None:
    serve = Serve(
        "--policy", str(policy), "--dns-listen", "127.0.0.1:0", "--nameserver", fake.nameserver
    )
    try:
        allowed = ask_dns(serve, "pkgs.test")
        assert [r.to_text() for rrset in allowed.answer for r in rrset] == ["203.0.113.7"]
        fake.reset_queries()
        refused = ask_dns(serve, "secret-data.other.test", tcp=True)
        assert refused.rcode() == dns.rcode.NXDOMAIN
        txt = ask_dns(serve, "pkgs.test", "TXT")
        assert txt.rcode() == dns.rcode.REFUSED
        assert fake.queries == []  # neither the refused name nor the TXT query went upstream
    finally:
        assert serve.stop() == 0


def test_the_dns_listener_drops_one_clients_questions_over_its_rate(
    policy: Path, fake: FakeDns
) -> None:
    """``--max-dns-queries-per-second`` and ``--dns-queries-burst`` reach the shared DNS gate: a
    client past its burst is answered no more (nothing asked upstream), another client still is.
    (One question in a thousand seconds: no token comes back while the test runs.)"""
    serve = Serve(
        "--policy", str(policy), "--dns-listen", "127.0.0.1:0", "--nameserver", fake.nameserver,
        "--max-dns-queries-per-second", "0.001", "--dns-queries-burst", "2",
    )  # fmt: skip
    query = dns.message.make_query("pkgs.test", "A")
    try:
        host, port = serve.info["dns"].rsplit(":", 1)
        for address, answered in (("127.0.0.2", [True, True, False]), ("127.0.0.3", [True])):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((address, 0))
                for expected in answered:
                    sock.settimeout(WAIT if expected else 1)  # dnspython waits on the socket
                    try:
                        dns.query.udp(query, host, port=int(port), timeout=WAIT, sock=sock)
                        got = True
                    except (TimeoutError, dns.exception.Timeout):
                        got = False
                    assert got == expected, (address, answered)
        assert len(fake.queries) <= 3
    finally:
        assert serve.stop() == 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-dns-queries-per-second", "-1", "not negative"),
        ("--max-dns-queries-per-second", "nan", "a finite number"),
        ("--max-new-connections-per-second", "inf", "a finite number"),
        ("--dns-queries-burst", "0", "must be at least 1"),
        ("--session-ttl", "nan", "not a finite number"),
        ("--drain-timeout", "inf", "not a finite number"),
        ("--watch-interval", "nan", "not a finite number"),
    ],
)
def test_a_bad_rate_stops_serve_before_it_starts(
    policy: Path, flag: str, value: str, message: str
) -> None:
    done = subprocess.run(
        [EGRESS, "serve", "--policy", str(policy), "--listen", "127.0.0.1:0", flag, value],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert done.returncode != 0 and flag in done.stderr and message in done.stderr, done.stderr


def test_one_sandbox_cannot_hold_every_tcp_connection_of_the_shared_dns_gate(
    policy: Path, fake: FakeDns
) -> None:
    """``--dns-listen`` answers every sandbox that can reach it: one client address gets its share
    of the TCP connections (16 of 64), and another is still answered while it holds them all."""
    from proxy.destinations.dnsgate import SHARED_TCP_PER_CLIENT

    serve = Serve(
        "--policy", str(policy), "--dns-listen", "127.0.0.1:0", "--nameserver", fake.nameserver
    )
    held: list[socket.socket] = []
    query = dns.message.make_query("pkgs.test", "A")
    try:
        host, port = serve.info["dns"].rsplit(":", 1)
        for _ in range(SHARED_TCP_PER_CLIENT + 1):
            sock = socket.socket()
            sock.settimeout(5)
            sock.bind(("127.0.0.2", 0))
            sock.connect((host, int(port)))
            held.append(sock)
        for sock in held[:SHARED_TCP_PER_CLIENT]:  # served: each one is counted by now
            assert dns.query.tcp(query, host, timeout=5, sock=sock).answer
        assert held[-1].recv(1) == b""  # over its share: closed unanswered
        other = socket.socket()
        other.settimeout(5)
        other.bind(("127.0.0.3", 0))
        other.connect((host, int(port)))
        with other:
            answer = dns.query.tcp(query, host, timeout=5, sock=other)
        assert [r.to_text() for rrset in answer.answer for r in rrset] == ["203.0.113.7"]
    finally:
        for sock in held:
            sock.close()
        assert serve.stop() == 0


def test_sighup_reloads_and_a_broken_reload_keeps_the_old_policy(
    policy: Path, fake: FakeDns
) -> None:
    serve = Serve("--policy", str(policy), "--nameserver", fake.nameserver)
    try:
        assert status(serve.port, "http://other.test/") == "403"
        policy.write_text(POLICY + "  - name: other\n    hosts: [other.test]\n    ports: [80]\n")
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_for_line("policy reloaded")
        # other.test is allowed now: the refusal no longer comes from the policy but from the upstream
        # being unreachable (203.0.113.8 is a documentation address), i.e. not a 403.
        assert status(serve.port, "http://other.test/") != "403"
        policy.write_text("version: 1\nrules:\n  - name: everything\n    hosts: ['*']\n")
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_for_line("policy reload failed")
        # The broken file must not have widened (or replaced) anything: pkgs/other rules still apply.
        assert status(serve.port, "http://denied.example/") == "403"
        assert any("policy.yaml:4" in line for line in serve.lines)
    finally:
        assert serve.stop() == 0


def test_startup_fails_closed_on_a_broken_policy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules:\n  - name: x\n    hosts: [ok.test]\n    ports: [0]\n")
    result = subprocess.run(
        [EGRESS, "serve", "--policy", str(broken), "--listen", "127.0.0.1:0", "--no-metrics"],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert "broken.yaml:5" in result.stderr


def test_startup_fails_closed_on_a_broken_sandboxes_file_or_sandbox_policy(
    tmp_path: Path, policy: Path
) -> None:
    digest = "a" * 64
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules:\n  - name: x\n    hosts: [ok.test]\n    ports: [0]\n")
    own_policy = tmp_path / "own.yaml"
    own_policy.write_text(
        f"version: 1\nsandboxes:\n  - id: agent-7\n    token_sha256: {digest}\n"
        "    policy: broken.yaml\n"
    )
    bad_id = tmp_path / "bad-id.yaml"
    bad_id.write_text(f'version: 1\nsandboxes:\n  - id: "agent-7\\n"\n    token_sha256: {digest}\n')
    for sandboxes, expected in (
        (own_policy, [f"{broken.name}:5", f"refusing to load {broken}: 1 problem(s)"]),
        (bad_id, ["'id' must be"]),
    ):
        result = subprocess.run(
            [EGRESS, "serve", "--policy", str(policy), "--listen", "127.0.0.1:0", "--no-metrics",
             "--sandboxes", str(sandboxes)],
            capture_output=True, text=True, timeout=30, env=clean_env(),
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "gate ready" not in result.stderr
        for text in expected:
            assert text in result.stderr


def test_handoff_socket_serves_egress_run_sandboxes_without_a_relay(
    tmp_path: Path, fake: FakeDns
) -> None:
    from tests.harness import Upstream

    upstream = Upstream("handoff-upstream")
    fake.set("local.test", "A", ["127.0.0.1"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: local\n    hosts: [local.test]\n    ports: [{upstream.port}]\n"
    )
    sock = tmp_path / "gate.sock"
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(policy), "--nameserver", fake.nameserver,
        "--handoff-socket", str(sock), "--decision-log", str(log),
    )  # fmt: skip
    try:
        run = subprocess.run(
            [EGRESS, "run", "--gate-socket", str(sock), "--sandbox-id", "sbx-handoff", "--quiet",
             "--", "sh", "-c",
             f"curl -sS --max-time 10 http://local.test:{upstream.port}/in; "
             f"curl -sS --max-time 5 -o /dev/null -w ' %{{http_code}}' http://evil.test/; "
             f"curl -sS --max-time 3 --noproxy '*' http://127.0.0.1:{upstream.port}/direct "
             "|| echo ' no-route'"],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "hello from handoff-upstream: GET /in" in run.stdout
        assert " 403" in run.stdout and "no-route" in run.stdout
        assert [target for _, target, _ in upstream.requests] == ["/in"]  # /direct never arrived
    finally:
        assert serve.stop() == 0
        upstream.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r.get("event") == "egress.decision"]
    assert {r.get("sandbox_id") for r in decisions} == {"sbx-handoff"}
    assert sorted(r["reason"] for r in decisions) == ["allowed-by-rule", "no-matching-rule"]


def test_localhost_and_hosts_file_names_work_without_a_nameserver(tmp_path: Path) -> None:
    """A rule for ``localhost`` (and for a name a container gets from its hosts file) works with
    the system's configuration: the gate reads the hosts file before DNS, and its DNS gate answers
    allowed names from it; the internal-address check still applies to what the file says."""
    from tests.harness import Upstream

    upstream = Upstream("local")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 mirror.internal\n10.1.1.1 inside.internal\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: local\n    hosts: [localhost, mirror.internal, inside.internal]\n"
        f"    ports: [{upstream.port}]\n"
    )
    serve = Serve(
        "--policy", str(policy), "--hosts-file", str(hosts), "--dns-listen", "127.0.0.1:0"
    )
    try:
        assert status(serve.port, f"http://localhost:{upstream.port}/") == "200"
        assert status(serve.port, f"http://mirror.internal:{upstream.port}/") == "200"
        assert upstream.accepted >= 1
        before = upstream.accepted
        assert status(serve.port, f"http://inside.internal:{upstream.port}/") == "403"
        assert upstream.accepted == before
        answer = ask_dns(serve, "mirror.internal")
        assert [r.to_text() for rrset in answer.answer for r in rrset] == ["127.0.0.1"]
    finally:
        assert serve.stop() == 0
        upstream.stop()


def test_the_default_hosts_file_serves_localhost(tmp_path: Path) -> None:
    """No --nameserver and no --hosts-file: ``localhost`` comes from /etc/hosts."""
    from tests.harness import Upstream

    if "localhost" not in Path("/etc/hosts").read_text():
        pytest.skip("this machine's /etc/hosts does not name localhost")
    upstream = Upstream("local")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8, '::1/128']\nrules:\n"
        f"  - name: local\n    hosts: [localhost]\n    ports: [{upstream.port}]\n"
    )
    serve = Serve("--policy", str(policy))
    try:
        assert status(serve.port, f"http://localhost:{upstream.port}/") == "200"
        assert upstream.accepted >= 1
    finally:
        assert serve.stop() == 0
        upstream.stop()


class HeldUpstream(LoopbackServer):
    """Answers each request only once the test releases it: a request kept in flight on demand."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrived = threading.Event()
        super().__init__(threaded=True, name="held-upstream")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            more = conn.recv(4096)
            if not more:
                return
            head += more
        self.arrived.set()
        if self.release.wait(WAIT * 3):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nheld")


def _drain_policy(tmp_path: Path, upstream: HeldUpstream) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: held\n    cidrs: [127.0.0.1/32]\n    ports: [{upstream.port}]\n"
    )
    return path


def _refuses_connections(port: int) -> bool:
    for _ in range(100):  # bounded: 5 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_stops_accepting_and_drains_requests_in_flight(tmp_path: Path) -> None:
    upstream = HeldUpstream()
    log = tmp_path / "decisions.jsonl"
    serve = Serve(
        "--policy", str(_drain_policy(tmp_path, upstream)), "--decision-log", str(log),
        "--drain-timeout", "30", "--nameserver", "127.0.0.1:9", "--hosts-file", "",
    )  # fmt: skip
    curl = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "--proxy", f"http://127.0.0.1:{serve.port}",
         "-o", "-", "-w", " %{http_code}", f"http://127.0.0.1:{upstream.port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        assert upstream.arrived.wait(WAIT)
        serve.proc.send_signal(signal.SIGTERM)
        assert _refuses_connections(serve.port)  # no new connection once draining
        assert serve.proc.poll() is None  # still serving the one in flight
        upstream.release.set()
        out, err = curl.communicate(timeout=30)
        assert out == "held 200", err
        assert serve.proc.wait(30) == 0
    finally:
        curl.kill()
        curl.wait()
        serve.stop()
        upstream.stop()
    # Every connection in flight was drained (a probe that raced the listener's close counts too).
    assert any(re.search(r"drained (\d+) of \1 connections", line) for line in serve.lines), (
        serve.lines
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["decision"] for r in records if r.get("event") == "egress.decision"] == ["allow"]


def test_a_drain_ends_at_its_deadline_and_the_gate_still_exits_cleanly(tmp_path: Path) -> None:
    upstream = HeldUpstream()
    serve = Serve(
        "--policy", str(_drain_policy(tmp_path, upstream)), "--drain-timeout", "0.5",
        "--nameserver", "127.0.0.1:9", "--hosts-file", "",
    )  # fmt: skip
    curl = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "--proxy", f"http://127.0.0.1:{serve.port}",
         "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{upstream.port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        assert upstream.arrived.wait(WAIT)
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0
        out, _ = curl.communicate(timeout=30)
        assert out != "200"  # cut off at the deadline, never answered
    finally:
        upstream.release.set()
        curl.kill()
        curl.wait()
        serve.stop()
        upstream.stop()
    assert any("closing 1 at the 0.5 s deadline" in line for line in serve.lines), serve.lines


def test_a_gate_killed_under_a_running_sandbox_stops_it_and_egress_run_says_so(
    tmp_path: Path,
) -> None:
    import psutil

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sock = tmp_path / "gate.sock"
    serve = Serve(
        "--policy", str(policy), "--handoff-socket", str(sock), "--nameserver", "127.0.0.1:9"
    )
    run = subprocess.Popen(
        [EGRESS, "run", "--gate-socket", str(sock), "--sandbox-id", "sbx-orphan", "--",
         "sh", "-c", "echo started $$; exec sleep 120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    try:
        assert run.stdout is not None
        line = run.stdout.readline()
        assert line.startswith("started"), line
        gate = psutil.Process(serve.proc.pid)
        served = waited_for(  # the shell execs sleep after the echo
            lambda: [
                c for c in psutil.Process(run.pid).children(recursive=True) if c.name() == "sleep"
            ],
            "the sandbox's command",
        )
        assert len(served) == 1
        gate.kill()  # SIGKILL: no goodbye to the sandbox
        _, err = run.communicate(timeout=60)
        assert run.returncode == 125, err
        assert "went away while the sandbox ran" in err and "no network route" in err
        assert not served[0].is_running() or served[0].status() == psutil.STATUS_ZOMBIE
    finally:
        run.kill()
        run.wait()
        serve.stop()


@pytest.mark.parametrize("via_mitmproxy", [False, True])
def test_plain_http_can_be_sent_through_mitmproxys_layers(
    policy: Path, via_mitmproxy: bool
) -> None:
    """``--plain-http-via-mitmproxy`` turns the front end's plain-HTTP path off. Told apart by the
    refusal of a HEAD: the front end sends its head only, mitmproxy's layers the text as well."""
    flag = ["--plain-http-via-mitmproxy"] if via_mitmproxy else []
    serve = Serve("--policy", str(policy), "--nameserver", "127.0.0.1:9", *flag)
    try:
        with socket.create_connection(("127.0.0.1", serve.port), timeout=WAIT) as sock:
            sock.sendall(b"HEAD http://denied.example/ HTTP/1.1\r\nHost: denied.example\r\n\r\n")
            sock.settimeout(1.0)
            data = b""
            for _ in range(16):  # bounded: until the gate goes quiet
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 403")
        assert (b"agent-egress refused this request" in data) is via_mitmproxy
    finally:
        assert serve.stop() == 0


def test_a_stop_while_dnspython_still_imports_stops_the_gate_never_ready(tmp_path: Path) -> None:
    """`egress serve` says it is ready once its background dnspython import has ended; a SIGTERM
    that comes while that import still runs (here one that would take a minute) stops it at once,
    and it never says it is ready."""
    slow = tmp_path / "slow" / "dns"
    slow.mkdir(parents=True)
    begun = tmp_path / "import-begun"
    (slow / "__init__.py").write_text(
        f"import pathlib, time\npathlib.Path({str(begun)!r}).touch()\ntime.sleep(60)\n"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    proc = subprocess.Popen(
        [EGRESS, "serve", "--listen", "127.0.0.1:0", "--no-metrics", "--policy", str(policy)],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(PYTHONPATH=str(slow.parent)),
    )
    try:
        wait_until(lambda: begun.exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1]
        assert begun.exists(), "the background import never began"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)  # not the import's minute
    finally:
        terminate(proc)
    assert proc.returncode == 0, err
    assert "gate ready" not in err
    assert "shutting down" in err


def test_the_shared_dns_listener_answers_no_name_a_sandboxs_own_policy_refuses(
    tmp_path: Path, fake: FakeDns
) -> None:
    """A DNS question carries no credential: ``--dns-listen`` cannot tell which sandbox asks. A name
    the gate's policy allows but a sandbox's own policy refuses is refused (NXDOMAIN, nothing asked
    upstream), so a narrow sandbox cannot send data in the labels of a wider policy's wildcard."""
    from proxy.policy.identities import token_digest

    wide = tmp_path / "policy.yaml"
    wide.write_text(POLICY + "  - name: wide\n    hosts: ['*.wide.test']\n")
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(POLICY)
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text(
        "version: 1\nsandboxes:\n"
        f"  - id: narrow\n    token_sha256: {token_digest('tok-narrow')}\n    policy: narrow.yaml\n"
        f"  - id: plain\n    token_sha256: {token_digest('tok-plain')}\n"
    )
    fake.set("secret-data.wide.test", "A", ["203.0.113.9"])
    serve = Serve(
        "--policy", str(wide), "--sandboxes", str(sandboxes), "--dns-listen", "127.0.0.1:0",
        "--nameserver", fake.nameserver,
    )  # fmt: skip
    try:
        allowed = ask_dns(serve, "pkgs.test")
        assert [r.to_text() for rrset in allowed.answer for r in rrset] == ["203.0.113.7"]
        fake.reset_queries()
        refused = ask_dns(serve, "secret-data.wide.test")
        assert refused.rcode() == dns.rcode.NXDOMAIN
        assert fake.queries == []
    finally:
        assert serve.stop() == 0
