"""``make demo``: one minute that shows what the gate does, on the shipped default allowlist.

It starts a private gate, sends a few requests a newcomer recognises through it with curl, and prints the
decisions they produced. The allowed request really goes to the package index (it is allowlisted, so the
gate lets it through); every refused one is stopped at the gate, so nothing leaves the machine for it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.decision import Decision
from proxy.emit import Emitter, MemorySink
from proxy.loader import load_policy
from proxy.presets import preset_path


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
    from proxy.resolver import Resolver

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


def main() -> int:
    if shutil.which("curl") is None:
        print("make demo needs curl (apt-get install curl)", file=sys.stderr)
        return 2
    return asyncio.run(_demo())


if __name__ == "__main__":
    raise SystemExit(main())
