"""``make fuzz``: the fuzzers for longer and with a fresh seed (printed, so a finding can be replayed
with ``FUZZ_SEED=... FUZZ_SECONDS=... make test PYTEST_ARGS=tests/fuzz``)."""

from __future__ import annotations

import os
import random
import secrets
import sys

import pytest


def main() -> int:
    seed = os.environ.get("FUZZ_SEED") or str(secrets.randbelow(2**32))
    os.environ["FUZZ_SEED"] = seed
    os.environ.setdefault("FUZZ_SECONDS", "600")
    print(f"fuzz seed {seed}, {os.environ['FUZZ_SECONDS']} s per fuzzer", flush=True)
    random.seed(int(seed))
    return pytest.main(
        ["-q", "-p", "no:cacheprovider", "-o", "timeout=7200", "tests/fuzz", *sys.argv[1:]]
    )


if __name__ == "__main__":
    raise SystemExit(main())
