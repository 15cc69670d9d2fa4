"""The credential step's cost: finding placeholders in a request, and scrubbing a response body.

``python -m bench credentials``. Rows, each timed with ``perf_counter_ns``:

- finding placeholders in a typical inspected request (16 headers, one of them ``Basic``, a target
  with a query) with 1, 10 and 100 credentials issued; the request carries none (the common case);
- the same with 10 credentials and a placeholder in ``Authorization`` (scan plus judge);
- a held 256 KiB body (the most a buffered body can be) searched for placeholders;
- the response scrubber's throughput on 64 KiB chunks (two values, none present), which every
  response from a bound host streams through.

Without ``--credentials`` none of this runs: the adapter builds nothing and the checkpoint returns at
once. Target: p99 <= 50 us per request at 10 credentials (a decision is ~20 us).
"""

from __future__ import annotations

import time

from bench.decisions import p50_p99_us
from proxy.core.credentials import (
    Binding,
    Carried,
    Credentials,
    Delivery,
    Scrubber,
    judge,
    placeholder_for,
)
from proxy.core.decision import Kind

SAMPLES = 20_000
HEADERS = (
    *((f"x-header-{i}", "a value of some length 0123456789abcdef") for i in range(14)),
    ("user-agent", "git/2.39.5"),
    ("authorization", "Basic eC1hY2Nlc3MtdG9rZW46bm90LWEtcGxhY2Vob2xkZXI="),
)
TARGET = "/myorg/repo.git/info/refs?service=git-upload-pack"


def _credentials(count: int) -> Credentials:
    bindings = {
        f"c{i}": Binding(f"c{i}", frozenset({(f"h{i}.test", 443)}), Delivery("authorization"))
        for i in range(count)
    }
    credentials = Credentials(bindings)
    for name in bindings:
        credentials.issue(name, "sbx", placeholder_for("ghp_" + "r" * 36))
    return credentials


def _time(call: object, samples: int) -> list[int]:
    clock = time.perf_counter_ns
    timings = [0] * samples
    for n in range(samples):
        start = clock()
        call()  # type: ignore[operator]
        timings[n] = clock() - start
    return timings


def _row(label: str, timings: list[int]) -> str:
    p50, p99 = p50_p99_us(timings)
    return f"| {label} | {p50:.1f} | {p99:.1f} |"


def main() -> int:
    lines = ["| credential step | p50 us | p99 us |", "| --- | --- | --- |"]
    for count in (1, 10, 100):
        credentials = _credentials(count)
        carried = Carried(HEADERS, TARGET)
        lines.append(_row(f"{count} credential(s), no placeholder", _time(
            lambda c=credentials, r=carried: c.scan(r), SAMPLES)))  # fmt: skip
    credentials = _credentials(10)
    placeholder = credentials.placeholder("c3", "sbx") or ""
    used = Carried((*HEADERS[:-1], ("authorization", f"Bearer {placeholder}")), TARGET)

    def use() -> None:
        found = credentials.scan(used)
        judge(credentials, found, kind=Kind.REQUEST, host="h3.test", port=443, method="GET",
              target=TARGET, sandbox_id="sbx", headers=used.headers)  # fmt: skip

    lines.append(_row("10 credentials, a use (scan and judge)", _time(use, SAMPLES)))
    body = Carried(HEADERS, TARGET, b"x" * 256 * 1024)
    lines.append(_row("10 credentials, 256 KiB body", _time(lambda: credentials.scan(body), 500)))
    scrubber = Scrubber([(b"ghp_" + b"R" * 36, b"ghp_" + b"P" * 36)] * 2)
    chunk = b"y" * 65536
    started = time.perf_counter()
    for _ in range(4000):
        scrubber.feed(chunk)
    seconds = time.perf_counter() - started
    lines.append(f"\nscrubber: {4000 * len(chunk) / seconds / 1e6:,.0f} MB/s on 64 KiB chunks")
    print("\n".join(lines))
    return 0
