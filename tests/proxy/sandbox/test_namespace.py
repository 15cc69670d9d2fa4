"""The sandbox itself, with real namespaces and a stand-in gate (the real gate is in test_launcher).

Every "unreachable" claim is checked on both ends: the probe inside sees the failure, and the
counting listener on the host saw nothing arrive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.sandbox.namespace import (
    Listener,
    Sandbox,
    SandboxError,
    SandboxSpec,
    own_netns_inode,
    socket_netns_inode,
)
from tests.harness import Canary
from tests.proxy.sandbox.conftest import (
    LISTENERS,
    WAIT,
    CountingTcp,
    CountingUdp,
    probe,
    processes_in_netns,
    run_in_sandbox,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]


def test_listeners_live_in_the_sandbox_netns_not_ours() -> None:
    spec = SandboxSpec(argv=["true"], env=dict(os.environ), listeners=LISTENERS)
    sandbox = Sandbox.spawn(spec)
    try:
        ours = own_netns_inode()
        assert sandbox.netns_inode != ours
        for name, sock in sandbox.sockets.items():
            assert socket_netns_inode(sock) == sandbox.netns_inode, name
        assert sandbox.sockets["proxy"].getsockname() == ("127.0.0.1", 3128)
        assert sandbox.sockets["dns-udp"].type == socket.SOCK_DGRAM
        sandbox.start()
        assert sandbox.wait(WAIT) == 0
    finally:
        sandbox.close_sockets()


def test_proxy_listener_reaches_the_gate_and_only_loopback_exists() -> None:
    result = probe(
        """
import json, socket
s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
got = s.recv(100).decode()
routes = open("/proc/net/route").read().splitlines()[1:]
routes6 = [l for l in open("/proc/net/ipv6_route").read().splitlines() if not l.endswith("lo")]
print(json.dumps({"got": got, "ifaces": [n for _, n in socket.if_nameindex()],
                  "routes": routes, "routes6": routes6,
                  "resolv": open("/etc/resolv.conf").read()}))
""",
        marker=b"hello from the stand-in\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.data["got"] == "hello from the stand-in\n"
    assert result.data["ifaces"] == ["lo"]
    assert result.data["routes"] == []  # IPv4: no route at all (loopback is in the local table)
    assert result.data["routes6"] == []
    assert "nameserver 127.0.0.1" in str(result.data["resolv"])
    assert "nameserver" not in str(result.data["resolv"]).replace("nameserver 127.0.0.1", "")


def test_host_loopback_tcp_is_unreachable(host_tcp: Canary) -> None:
    result = probe(
        f"""
import json, socket
out = {{}}
for host in ("127.0.0.1", "127.0.0.2", "localhost"):
    try:
        socket.create_connection((host, {host_tcp.port}), timeout=3).close()
        out[host] = "connected"
    except OSError as exc:
        out[host] = exc.__class__.__name__
print(json.dumps(out))
"""
    )
    assert result.returncode == 0, result.stderr
    assert set(result.data.values()) == {"ConnectionRefusedError"}
    assert host_tcp.accepted == 0


def test_curl_noproxy_to_host_loopback_fails(host_tcp: Canary) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = run_in_sandbox(
        ["curl", "-sS", "--noproxy", "*", "-m", "5", f"http://127.0.0.1:{host_tcp.port}/"]
    )
    assert result.returncode == 7, result.stderr  # couldn't connect
    assert host_tcp.accepted == 0


def test_udp_out_and_to_host_loopback_fails(host_udp: CountingUdp) -> None:
    source = 20000  # the canary's port is above 60999 (tests.harness.on_a_namespace_port)
    result = probe(
        f"""
import json, socket
out = {{}}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {source}))  # not the canary's port: a socket of that port would hear itself
try:
    s.sendto(b"q", ("192.0.2.1", 53))  # TEST-NET-1: no route inside, nothing is emitted
    out["outside"] = "sent"
except OSError as exc:
    out["outside"] = exc.__class__.__name__ + ":" + str(exc.errno)
s.settimeout(1)
s.sendto(b"q", ("127.0.0.1", {host_udp.port}))
try:
    s.recv(100)
    out["host_loopback"] = "answered"
except OSError as exc:
    out["host_loopback"] = exc.__class__.__name__
print(json.dumps(out))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.data["outside"] == "OSError:101"  # ENETUNREACH
    assert result.data["host_loopback"] in ("ConnectionRefusedError", "TimeoutError")
    assert host_udp.received == 0


def test_ipv6_fails() -> None:
    host6 = CountingTcp("::1")
    try:
        result = probe(
            f"""
import json, socket
out = {{}}
for name, addr in (("outside", ("2001:db8::1", 443)), ("host_loopback", ("::1", {host6.port})),
                   ("mapped", ("::ffff:192.0.2.1", 443))):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        out[name] = "connected"
    except OSError as exc:
        out[name] = exc.__class__.__name__ + ":" + str(exc.errno)
print(json.dumps(out))
"""
        )
    finally:
        host6.stop()
    assert result.returncode == 0, result.stderr
    assert result.data["outside"] == "OSError:101"
    assert result.data["mapped"] == "OSError:101"
    assert str(result.data["host_loopback"]).startswith("ConnectionRefusedError")
    assert host6.accepted == 0


def test_command_has_no_capabilities_and_cannot_gain_any() -> None:
    result = probe(
        """
import json
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs")}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.data == {
        "CapEff": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapBnd": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }


def test_tampering_from_inside_opens_nothing(host_tcp: Canary) -> None:
    """ip route / ip link / a nested user namespace with CAP_NET_ADMIN / a new resolv.conf: none of
    them gives a route to the host."""
    ip = shutil.which("ip")
    unshare = shutil.which("unshare")
    if ip is None or unshare is None:
        pytest.skip("ip or unshare is not installed")
    script = f"""
{ip} route add default dev lo 2>/dev/null && echo ROUTE-ADDED
{ip} link add veth-x type veth peer name veth-y 2>/dev/null && echo VETH-ADDED
echo 'nameserver 192.0.2.53' > /etc/resolv.conf 2>/dev/null && echo RESOLV-WRITTEN
umount /etc/resolv.conf 2>/dev/null && echo RESOLV-UNMOUNTED
umount /proc 2>/dev/null && echo PROC-UNMOUNTED
{unshare} -Urn sh -c '{ip} link set lo up; {ip} route add default dev lo && echo NESTED-ROUTE;
  {sys.executable} -I -c "import socket; socket.create_connection((\\"127.0.0.1\\", {host_tcp.port}), timeout=3)" 2>/dev/null && echo NESTED-CONNECTED'
{sys.executable} -I -c "import socket; socket.create_connection(('127.0.0.1', {host_tcp.port}), timeout=3)" 2>/dev/null && echo CONNECTED
echo done
"""
    result = run_in_sandbox(["sh", "-c", script])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    for forbidden in (
        "ROUTE-ADDED",
        "VETH-ADDED",
        "RESOLV-WRITTEN",
        "RESOLV-UNMOUNTED",
        "PROC-UNMOUNTED",
        "NESTED-CONNECTED",
        "CONNECTED",
    ):
        assert forbidden not in lines, (forbidden, result.stdout)
    assert lines[-1] == "done"
    assert host_tcp.accepted == 0


# Files whose permission checks key on the owner's uid (root's), not on capabilities.
KERNEL_FILES = [
    "/proc/sys/kernel/printk_ratelimit_burst",
    "/proc/sys/vm/overcommit_memory",
    "/etc/hosts",
    *(str(p) for p in sorted(Path("/sys/fs/cgroup").glob("*/cgroup.procs"))[:2]),
    *(str(p) for p in sorted(Path("/sys/fs/cgroup").glob("*/*.max"))[:1]),
]


@pytest.mark.skipif(os.getuid() != 0, reason="only a command launched by root owns these files")
def test_a_command_launched_by_root_cannot_write_the_kernels_settings_or_the_hosts_file() -> None:
    """Each file is opened for writing and closed without a byte written, so a sandbox that could
    open it changes nothing (``core_pattern`` would run a program as root on the next crash)."""
    writable = [p for p in KERNEL_FILES if os.path.exists(p) and os.access(p, os.W_OK)]
    assert "/proc/sys/kernel/printk_ratelimit_burst" in writable  # outside, root may write them
    result = probe(
        f"""
import json, os
out = {{}}
for path in {writable!r}:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        out[path] = "opened"
    except OSError as exc:
        out[path] = os.strerror(exc.errno)
print(json.dumps(out))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.data == {p: "Read-only file system" for p in writable}, result.data


def test_the_command_has_its_own_ipc_and_host_name_namespaces() -> None:
    result = probe(
        """
import json, os
print(json.dumps({n: os.readlink(f"/proc/self/ns/{n}") for n in ("ipc", "uts")}))
"""
    )
    assert result.returncode == 0, result.stderr
    for name in ("ipc", "uts"):
        assert result.data[name] != os.readlink(f"/proc/self/ns/{name}"), name


def test_only_sandbox_processes_are_visible() -> None:
    result = probe(
        f"""
import json, os
print(json.dumps({{"pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "launcher_visible": os.path.exists("/proc/{os.getpid()}/ns/net") and {os.getpid()} > 2}}))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.data["pids"] == [1, 2]  # our init and the probe itself
    assert result.data["launcher_visible"] is False


@pytest.mark.parametrize(("script", "expected"), [("exit 7", 7), ("kill -TERM $$", 143)])
def test_exit_status_propagates(script: str, expected: int) -> None:
    assert run_in_sandbox(["sh", "-c", script]).returncode == expected


def test_missing_command_is_127_and_not_found_message() -> None:
    result = run_in_sandbox(["/nonexistent/egress-test-command"])
    assert result.returncode == 127
    assert "command not found" in result.stderr


def test_a_command_that_cannot_be_executed_is_126() -> None:
    result = run_in_sandbox(["/etc/passwd"])  # a file, never executable
    assert result.returncode == 126
    assert "/etc/passwd" in result.stderr


def test_the_command_starts_with_default_signals_and_a_process_group_of_its_own() -> None:
    """As a fresh process would: no signal ignored (the launcher and init ignore SIGPIPE and
    SIGXFSZ, as Python does, and init catches the ones it forwards) but glibc's two internal ones,
    which its ``posix_spawn`` leaves ignored and no program relies on; nothing blocked; and a
    process group of its own, which init signals as a whole. The launcher here starts with
    signals blocked, as a harness's thread may: the command still starts with none."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        # the command itself reads both (a shell would set its own mask and signals)
        result = run_in_sandbox(["cat", "/proc/self/status", "/proc/self/stat"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    status = dict(line.split(":", 1) for line in lines[:-1] if ":" in line)
    glibc_internal = (1 << (32 - 1)) | (1 << (33 - 1))  # SIGCANCEL, SIGSETXID
    assert int(status["SigIgn"], 16) & ~glibc_internal == 0, status["SigIgn"]
    assert int(status["SigBlk"], 16) == 0, status["SigBlk"]
    stat = lines[-1].split()
    assert stat[:2] == ["2", "(cat)"]  # the command, init's child
    assert stat[4] == stat[0]  # its process group is its own


@pytest.mark.parametrize(
    ("path", "expected"), [("/nonexistent-egress-path", 127), ("/usr/bin:/bin", 0)]
)
def test_the_command_is_looked_up_on_its_own_path_not_the_launchers(
    path: str, expected: int
) -> None:
    """The helper forked from the launcher keeps the launcher's environment; the command's own
    PATH is the one searched (run in a single-threaded process, so that the helper is forked)."""
    code = f"""if True:
        import os
        from proxy.sandbox.namespace import Sandbox, SandboxSpec, _can_fork
        from tests.proxy.sandbox.conftest import LISTENERS
        assert _can_fork(None, None, 2)
        os.environ["PATH"] = "/usr/bin:/bin"
        env = dict(os.environ, PATH={path!r})
        sandbox = Sandbox.spawn(SandboxSpec(argv=["true"], env=env, listeners=LISTENERS), stderr=2)
        sandbox.start()
        print(sandbox.wait(30))
    """
    proc = _launcher(code)
    assert proc.stdout.split() == [str(expected)], proc.stderr
    assert ("command not found" in proc.stderr) is (expected == 127), proc.stderr


def _launcher(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh single-threaded interpreter at the project's root, as a launcher."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )


def test_signal_to_the_helper_reaches_the_command() -> None:
    spec = SandboxSpec(
        argv=[
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        env=dict(os.environ),
        listeners=LISTENERS[:1],
    )
    sandbox = Sandbox.spawn(spec, stdout=subprocess.PIPE)
    try:
        sandbox.start()
        assert sandbox.proc.stdout is not None
        assert sandbox.proc.stdout.readline() == b"ready\n"
        sandbox.send_signal(signal.SIGTERM)
        assert sandbox.wait(WAIT) == 42
        assert b"got-term" in sandbox.proc.stdout.read()
    finally:
        sandbox.close_sockets()


def test_nothing_is_left_behind_after_exit() -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    result = run_in_sandbox(["sh", "-c", "sleep 300 & sleep 300 & setsid sleep 300 & echo started"])
    assert result.returncode == 0
    deadline = time.monotonic() + WAIT
    while processes_in_netns(result.netns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in_netns(result.netns) == []  # background and setsid'd children included
    assert not os.path.exists(f"/proc/{result.helper_pid}")
    assert Path("/proc/self/mountinfo").read_text() == mounts_before


def test_abort_never_runs_the_command(tmp_path: object) -> None:
    marker = f"{tmp_path}/ran"
    spec = SandboxSpec(argv=["touch", marker], env=dict(os.environ), listeners=LISTENERS[:1])
    sandbox = Sandbox.spawn(spec)
    sandbox.abort()
    assert not os.path.exists(marker)
    assert processes_in_netns(sandbox.netns_inode) == []


def test_listener_that_cannot_be_created_fails_closed(tmp_path: object) -> None:
    marker = f"{tmp_path}/ran"
    clash = [Listener("proxy", "tcp", 3128), Listener("again", "tcp", 3128)]
    with pytest.raises(SandboxError, match="again listener"):
        Sandbox.spawn(SandboxSpec(argv=["touch", marker], env=dict(os.environ), listeners=clash))
    assert not os.path.exists(marker)


def test_five_sandboxes_at_once_are_isolated_from_each_other() -> None:
    """Each sees its own gate on the same 127.0.0.1:3128, and none reaches another's loopback."""
    sandboxes = []
    try:
        for i in range(5):
            spec = SandboxSpec(
                argv=[
                    sys.executable,
                    "-I",
                    "-c",
                    PEER_PROBE,
                ],
                env={**os.environ, "INDEX": str(i)},
                listeners=LISTENERS[:1],
            )
            sandboxes.append(Sandbox.spawn(spec, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        from tests.proxy.sandbox.conftest import StandIn

        stand_ins = [
            StandIn(sb.sockets["proxy"], f"gate-{i}".encode()) for i, sb in enumerate(sandboxes)
        ]
        for sb in sandboxes:
            sb.start()
        for sb in sandboxes:  # every sandbox now listens on its own 127.0.0.1:7000
            assert sb.proc.stdout is not None
            assert sb.proc.stdout.readline() == b"listening\n"
        results = []
        for sb in sandboxes:
            assert sb.proc.stdin is not None
            sb.proc.stdin.write(b"go\n")
            sb.proc.stdin.flush()
        for sb in sandboxes:
            assert sb.proc.stdout is not None
            results.append(json.loads(sb.proc.stdout.readline()))
            assert sb.wait(WAIT) == 0
        for i, got in enumerate(results):
            assert got["gate"] == f"gate-{i}"
            assert got["peer_accepts"] == 0  # nobody else reached its 127.0.0.1:7000
            assert got["self"] == "self"
        assert len({sb.netns_inode for sb in sandboxes}) == 5
        for stand_in in stand_ins:
            stand_in.stop()
    finally:
        for sb in sandboxes:
            sb.close_sockets()
            if sb.proc.poll() is None:
                sb.kill()


PEER_PROBE = """
import json, os, socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 7000)); srv.listen(8)
accepted = []
def accept():
    while True:
        c, _ = srv.accept(); accepted.append(1); c.sendall(b"self"); c.close()
threading.Thread(target=accept, daemon=True).start()
print("listening", flush=True)
sys.stdin.readline()
gate = socket.create_connection(("127.0.0.1", 3128), timeout=5).recv(100).decode()
me = socket.create_connection(("127.0.0.1", 7000), timeout=5).recv(100).decode()
print(json.dumps({"gate": gate, "self": me, "peer_accepts": len(accepted) - 1}), flush=True)
"""


def test_the_helper_is_forked_only_from_a_single_threaded_launcher_without_pipes() -> None:
    """Forking copies only the calling thread: a lock another thread held would stay locked in the
    helper, so a threaded launcher (and one that needs pipes made) starts the helper as a script."""
    code = """if True:
        import subprocess, sys, threading
        from proxy.sandbox.namespace import _can_fork
        single = _can_fork(None, sys.stderr, 2)
        piped = _can_fork(subprocess.PIPE, None, None) or _can_fork(None, subprocess.DEVNULL, None)
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        print(single, piped, _can_fork(None, None, None))
    """
    proc = _launcher(code)
    assert proc.stdout.split() == ["True", "False", "False"], proc.stderr


def test_a_signal_that_reaches_init_before_its_release_means_the_command_never_runs(
    tmp_path: Path,
) -> None:
    """The launcher forwards signals from the moment it releases the command: one that reaches
    init before "go" (which a PID namespace's init would otherwise drop) makes init exit 128+N
    without starting the command. The test waits until init has its handler, signals init, waits
    until the kernel has delivered it (no longer pending), then releases."""
    marker = tmp_path / "ran"
    code = f"""if True:
        import os, signal, time
        from proxy.sandbox.namespace import Sandbox, SandboxSpec
        from tests.proxy.sandbox.conftest import LISTENERS

        def status(pid, field):
            for line in open(f"/proc/{{pid}}/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
            return 0

        term = 1 << (signal.SIGTERM - 1)
        spec = SandboxSpec(argv=["touch", {str(marker)!r}], env=dict(os.environ), listeners=LISTENERS)
        sandbox = Sandbox.spawn(spec, stderr=2)
        init = int(open(f"/proc/{{sandbox.pid}}/task/{{sandbox.pid}}/children").read().split()[0])
        deadline = time.monotonic() + 20
        while not status(init, "SigCgt") & term and time.monotonic() < deadline:
            time.sleep(0.01)
        print("caught", bool(status(init, "SigCgt") & term))
        os.kill(init, signal.SIGTERM)
        while (status(init, "SigPnd") | status(init, "ShdPnd")) & term and time.monotonic() < deadline:
            time.sleep(0.01)
        sandbox.start()
        print(sandbox.wait(30))
    """
    proc = _launcher(code)
    assert proc.stdout.split() == ["caught", "True", str(128 + signal.SIGTERM)], proc.stderr
    assert not marker.exists()
