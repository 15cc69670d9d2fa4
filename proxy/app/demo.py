"""``make demo``: one minute that shows what the gate does, on the shipped default allowlist.

It runs a few commands a newcomer recognises inside ``egress run`` (a sandbox whose only route is a private
gate): a package download that is allowed, requests that are refused, and a ``--noproxy`` bypass attempt
that finds no route at all; ``egress run`` then prints its summary. The allowed requests really go to the
package index (it is allowlisted); every refused one is stopped at the gate or finds no route, so nothing
leaves the machine for it. Where network namespaces are unavailable the demo says so and shows the gate
on its own instead.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

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
    from proxy.destinations.resolver import Resolver

    path = preset_path("default")
    policy = load_policy(path)
    memory = MemorySink()
    gate = Gate(GateConfig(listen_port=0), lambda: policy, Emitter([memory]), Resolver())
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
                *step.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
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
    print(
        "Decisions recorded (under `egress serve` each is also a JSON log line, and with evidence"
    )
    print("flags an OTel event, an audit journal record and a metric):")
    print(_table(list(memory.decisions)))
    return 0


SANDBOX_SCRIPT = r"""
if [ -t 1 ]; then b=$(printf '\033[1m'); n=$(printf '\033[0m'); else b=; n=; fi
say() { printf '\n%s# %s%s\n$ %s\n' "$b" "$1" "$n" "$2"; }
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
printf '\n'
"""


def _sandbox_demo() -> int | None:
    """Run the demo inside ``egress run``; None when no sandbox can be created here."""
    import os

    egress = shutil.which("egress", path=os.path.dirname(sys.executable)) or "egress"
    policy = preset_path("default")
    print(f"agent-egress demo: `egress run --policy {policy} -- sh -c ...`")
    print("(a sandbox whose only route is a private gate on the default allowlist)")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        [egress, "run", "--policy", str(policy), "--", "sh", "-c", SANDBOX_SCRIPT],
        env=env,
        timeout=300,
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
