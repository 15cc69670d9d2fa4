"""One benchmark client run: curl does the work, this script times it and prints one JSON line.

Runs as ``python -I -S bench/_client.py SPEC`` (stdlib only) on the host or inside a sandbox, so the
same client measures every configuration and a sandbox's start-up is never inside the timed part.
SPEC is JSON: ``case`` (tunnels, bulk, keepalive, denial), ``proxy`` (URL or null for direct),
``host``, ``tls_port``, ``http_port``, ``n``, ``parallel``.

- tunnels: ``n`` HTTPS GETs of a 2-byte body, each on a new connection (``Connection: close``, no
  TLS session reuse), so through a proxy each is a new CONNECT tunnel, ``parallel`` at a time.
- bulk: one HTTPS GET of ``/bulk``; curl's own transfer rate.
- keepalive: ``n`` plain-HTTP GETs that curl sends over one kept-alive connection.
- denial: ``n`` HTTPS GETs of a host no policy allows; the time until curl has the refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FORMAT = "%{time_total} %{http_code} %{speed_download} %{size_download}\\n"


def main(spec: dict[str, object]) -> dict[str, object]:
    case = spec["case"]
    host = str(spec.get("host", "127.0.0.1"))
    n = int(str(spec.get("n", 1)))
    if case == "tunnels":
        urls = [f"https://{host}:{spec['tls_port']}/"] * n
        extra = ["-H", "Connection: close", "--no-sessionid"]
    elif case == "bulk":
        urls = [f"https://{host}:{spec['tls_port']}/bulk"]
        extra = []
    elif case == "keepalive":
        urls = [f"http://{host}:{spec['http_port']}/"] * n
        extra = []
    elif case == "denial":
        urls = ["https://denied.invalid/"] * n
        extra = []
    else:
        raise SystemExit(f"unknown case {case!r}")
    proxy = spec.get("proxy")
    if proxy == "env":  # a peer's sandbox names its proxy (with its session credential) in the env
        proxy = os.environ.get("HTTP_PROXY" if case == "keepalive" else "HTTPS_PROXY") or None
        if proxy is None:
            raise SystemExit("no proxy in the sandbox's environment")
    route = ["--noproxy", "", "--proxy", str(proxy)] if proxy else ["--noproxy", "*"]
    parallel = int(str(spec.get("parallel", 1)))
    if parallel > 1:
        extra += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    conf = "".join(f'url = "{url}"\noutput = "/dev/null"\n' for url in urls)
    argv = ["curl", "-sk", "--max-time", "120", "-w", FORMAT, *route, *extra, "-K", "-"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    started = time.perf_counter()
    proc = subprocess.run(argv, input=conf, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - started
    times: list[float] = []
    codes: dict[str, int] = {}
    speed = size = 0.0
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        times.append(float(parts[0]))
        codes[parts[1]] = codes.get(parts[1], 0) + 1
        speed, size = float(parts[2]), float(parts[3])
    return {"elapsed": elapsed, "times": times, "codes": codes, "speed": speed, "size": size}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
