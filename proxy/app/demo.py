"""``make demo``: one minute that shows what the gate does, on the shipped default allowlist.

It runs a few commands a newcomer recognises inside ``egress run`` (a sandbox whose only route is a private
gate): a package download that is allowed, requests that are refused, a ``--noproxy`` bypass attempt
that finds no route at all, and a ``git clone`` that works next to a ``git push`` that is refused;
``egress run`` then prints its summary. The allowed requests really go to the package index (it is
allowlisted); every refused one is stopped at the gate or finds no route, so nothing leaves the machine
for it. The git server is local (``git http-backend`` over TLS on loopback, standing in for GitHub under
GitHub's read-only rules): the demo must not push anywhere real, and its request log shows that no push
reached it. Where network namespaces are unavailable the demo says so and shows the gate on its own
instead.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.core.decision import Decision
from proxy.evidence.emit import Emitter, MemorySink
from proxy.policy.loader import load_policy
from proxy.policy.presets import preset_path


@dataclass(frozen=True)
class Step:
    title: str
    argv: Sequence[str]


def steps(proxy: str) -> list[Step]:
    curl = ["curl", "-sS", "-o", "/dev/null", "--max-time", "15", "--proxy", proxy]
    fmt = ["-w", "%{http_code}"]
    return [
        Step("an allowed package index", [*curl, *fmt, "https://pypi.org/simple/six/"]),
        Step("a host that is not on the allowlist", [*curl, *fmt, "https://example.com/"]),
        Step(
            "the cloud metadata service",
            [*curl, *fmt, "http://169.254.169.254/latest/meta-data/"],
        ),
        Step(
            "an allowed host on a port its rule does not list",
            [*curl, *fmt, "https://pypi.org:8443/"],
        ),
        Step(
            "domain fronting: CONNECT to pypi.org, TLS SNI naming another host",
            [
                *curl,
                *fmt,
                "--connect-to",
                "example.com:443:pypi.org:443",
                "https://example.com/",
            ],
        ),
    ]


def _table(decisions: Sequence[Decision]) -> str:
    rows = [("decision", "kind", "destination", "rule", "reason")]
    for d in decisions:
        where = d.host if d.port is None else f"{d.host}:{d.port}"
        rows.append((str(d.decision), str(d.kind), where, d.rule or "-", str(d.reason)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    )


async def _demo() -> int:
    from addons.master import Gate, GateConfig
    from proxy.app import statedir
    from proxy.app.ca import ensure_ca, write_bundle
    from proxy.destinations.resolver import Resolver

    path = preset_path("default")
    policy = load_policy(path)
    memory = MemorySink()
    confdir = statedir.mitmproxy_confdir(statedir.prepare_state_dir(statedir.default_state_dir()))
    files = ensure_ca(confdir)
    scratch = Path(tempfile.mkdtemp(prefix="egress-demo-"))
    bundle = write_bundle(scratch, files.cert)  # curl trusts the gate for inspected hosts
    gate = Gate(
        GateConfig(listen_port=0, confdir=str(confdir)),
        lambda: policy,
        Emitter([memory]),
        Resolver(),
    )
    await gate.start()
    host, port = gate.listen_address
    proxy = f"http://{host}:{port}"
    print(f"agent-egress demo: gate on {proxy}")
    print(
        f"policy {path} (version {policy.version}, {len(policy.rules)} rules, mode {policy.mode})\n"
    )
    try:
        for step in steps(proxy):
            print(f"# {step.title}")
            print("$ " + " ".join(a if " " not in a else repr(a) for a in step.argv))
            before = len(memory.decisions)
            proc = await asyncio.create_subprocess_exec(
                *step.argv[:1],
                "--cacert",
                str(bundle),
                *step.argv[1:],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
            new = list(memory.decisions)[before:]
            refused = [d for d in new if not d.allowed]
            if refused:
                d = refused[0]
                print(
                    f"  -> refused by the gate: {d.reason}" + (f" ({d.detail})" if d.detail else "")
                )
            elif new:
                status = out.decode().strip() or "no response"
                extra = "" if proc.returncode == 0 else f"; curl: {err.decode().strip()}"
                print(f"  -> allowed by rule {new[0].rule}: HTTP {status}{extra}")
            else:
                print(f"  -> no decision (curl exit {proc.returncode}: {err.decode().strip()})")
            print()
    finally:
        await gate.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        "Decisions recorded (under `egress serve` each is also a JSON log line, and with evidence"
    )
    print("flags an OTel event, an audit journal record and a metric):")
    print(_table(list(memory.decisions)))
    return 0


PRELUDE = r"""
if [ -t 1 ]; then b=$(printf '\033[1m'); n=$(printf '\033[0m'); else b=; n=; fi
say() { printf '\n%s# %s%s\n$ %s\n' "$b" "$1" "$n" "$2"; }
"""

NETWORK_STEPS = r"""
say "an allowed package index" "curl https://pypi.org/simple/six/"
curl -sS -o /dev/null --max-time 20 -w 'HTTP %{http_code}\n' https://pypi.org/simple/six/
say "a package download (pip honours the proxy the sandbox sets)" "pip download six"
"$PYTHON" -m pip download --isolated --no-deps --no-cache-dir --disable-pip-version-check \
    --index-url https://pypi.org/simple -d "$(mktemp -d)" six 2>&1 | tail -n 2
say "a host that is not on the allowlist" "curl https://example.com/"
curl -sS -o /dev/null --max-time 20 https://example.com/ 2>&1
say "the cloud metadata service" "curl http://169.254.169.254/latest/meta-data/"
curl -sS --max-time 20 http://169.254.169.254/latest/meta-data/ | head -n 4
say "ignoring the proxy: there is no route at all" "curl --noproxy '*' https://pypi.org/"
curl -sS -o /dev/null --max-time 5 --noproxy '*' https://pypi.org/ 2>&1 || true
say "raw DNS to an outside resolver" "python: socket.sendto(..., ('192.0.2.53', 53))"
"$PYTHON" -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: s.sendto(b'x', ('192.0.2.53', 53)); print('sent?!')
except OSError as e: print('refused by the kernel:', e.strerror)"
"""

GIT_STEPS = r"""
if [ -n "$GIT_URL" ]; then
say "git clone from a GitHub stand-in (read-only rules: the gate reads each request)" \
    "git clone $GIT_URL"
d=$(mktemp -d) && git clone -q "$GIT_URL" "$d/demo" && echo "cloned: $(cat "$d/demo/README")"
say "git push to it: refused before anything reaches the server" "git push"
cd "$d/demo" && echo change >> README && git -c user.name=agent \
    -c user.email=agent@example.invalid commit -qam change && git push -q origin HEAD:main 2>&1 |
    grep -E "remote: (agent-egress|  rule|  reason)|fatal"
cd /
fi
"""

SANDBOX_SCRIPT = PRELUDE + NETWORK_STEPS + GIT_STEPS + "printf '\\n'\n"

GIT_HOST = "git.demo.test"


def _git_stand_in(directory: Path) -> tuple[Any, Path, Path] | None:
    """A local TLS git server named git.demo.test and a policy: the default plus GitHub's read-only
    rules pointed at it. None when git is not installed."""
    from proxy.app.demogit import GitServer, make_repository, throwaway_tls
    from proxy.policy.yamlnodes import safe_dump, safe_load

    try:
        bare = make_repository(directory / "git")
    except FileNotFoundError:
        return None
    ca, tls = throwaway_tls(directory / "tls", [GIT_HOST])
    server = GitServer(bare.parent.parent, tls=tls)
    github = safe_load(preset_path("github-readonly").read_text())
    assert isinstance(github, dict)
    rules = [
        {**rule, "name": f"demo-{rule['name']}", "hosts": [GIT_HOST], "ports": [server.port]}
        for rule in github["rules"]
        if "github.com" in rule["hosts"]
    ]
    policy = directory / "policy.yaml"
    policy.write_text(
        "# The default policy, and GitHub's read-only rules pointed at a local stand-in.\n"
        + safe_dump(
            {
                "version": 1,
                "allow_internal": ["127.0.0.1/32"],  # the stand-in lives on this machine
                "include": ["default"],
                "rules": rules,
            },
            sort_keys=False,
        )
    )
    hosts = directory / "hosts"
    hosts.write_text(f"127.0.0.1 {GIT_HOST}\n")
    return server, policy, ca


def _sandbox_demo() -> int | None:
    """Run the demo inside ``egress run``; None when no sandbox can be created here."""
    import os

    egress = shutil.which("egress", path=os.path.dirname(sys.executable)) or "egress"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHON"] = sys.executable
    with tempfile.TemporaryDirectory(prefix="egress-demo-") as tmp:
        stand_in = _git_stand_in(Path(tmp))
        policy = preset_path("default")
        extra: list[str] = []
        if stand_in is not None:
            server, policy, ca = stand_in
            env["GIT_URL"] = f"https://{GIT_HOST}:{server.port}/myorg/demo.git"
            extra = ["--hosts-file", str(Path(tmp) / "hosts"), "--upstream-ca", str(ca)]
        print(f"agent-egress demo: `egress run --policy {policy} -- sh -c ...`")
        print("(a sandbox whose only route is a private gate on the default allowlist)")
        try:
            proc = subprocess.run(
                [egress, "run", "--policy", str(policy), *extra, "--", "sh", "-c", SANDBOX_SCRIPT],
                env=env,
                timeout=300,
            )
        finally:
            if stand_in is not None:
                stand_in[0].stop()
        if stand_in is not None and proc.returncode != 125:
            server = stand_in[0]
            pushes = sum("receive-pack" in target for _, target in server.requests)
            print(
                f"The local git server received {len(server.requests)} request(s) for the clone, "
                f"and {pushes} for the push."
            )
    if proc.returncode == 125:  # the sandbox could not be set up; egress run said why
        return None
    return 0


def main() -> int:
    if shutil.which("curl") is None:
        print("make demo needs curl (apt-get install curl)", file=sys.stderr)
        return 2
    result = _sandbox_demo()
    if result is not None:
        return result
    print("\nNo sandbox here, so showing the gate on its own (clients that honour HTTPS_PROXY):\n")
    return asyncio.run(_demo())


if __name__ == "__main__":
    raise SystemExit(main())
