"""Shared fixtures: the hermetic DNS server, a test CA, counting upstreams and a real gate factory."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.dnsfake import FakeDns
from tests.harness import LocalCA, RunningGate, Upstream, serving

# Property tests are reproducible in the suite (a fixed derivation of examples, no example database);
# `HYPOTHESIS_PROFILE=explore` searches afresh with random seeds.
settings.register_profile("suite", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


_MADE_HERE = "EGRESS_TEST_STATE_DIR_MADE"  # set beside a state directory this file made


def pytest_configure(config: pytest.Config) -> None:
    """Every `egress serve` a test starts keeps its state (mitmproxy's CA) in a temporary directory,
    never in the home of whoever runs the tests. Set before collection: modules copy os.environ.
    Each `make test` worker (pytest-xdist) gets its own, so no two gates race to make one CA (in
    a directory given by whoever runs the tests, a subdirectory per worker)."""
    made_by_controller = os.environ.get(_MADE_HERE) == "1"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    given = os.environ.get("EGRESS_STATE_DIR")
    if given is None or (worker and made_by_controller):
        path = tempfile.mkdtemp(prefix=f"egress-test-state-{worker or 'main'}-")
        os.environ["EGRESS_STATE_DIR"] = path
        os.environ[_MADE_HERE] = "1"
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    elif worker:  # given by whoever runs the tests: one subdirectory of it per process
        path = os.path.join(given, worker)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.environ["EGRESS_STATE_DIR"] = path


TEST_NAMES = ["allowed.test", "other.test", "evil.test", "sub.allowed.test", "127.0.0.1"]


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        yield server


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"), TEST_NAMES)


@pytest.fixture
def tls_upstream(test_ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("tls-upstream", tls=test_ca.server_context()))


@pytest.fixture
def http_upstream() -> Iterator[Upstream]:
    yield from serving(Upstream("http-upstream"))


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str], Path]:
    counter = iter(range(1000))

    def write(text: str) -> Path:
        path = tmp_path / f"policy-{next(counter)}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def start_gate(fake_dns: FakeDns) -> Iterator[Callable[..., RunningGate]]:
    gates: list[RunningGate] = []

    def start(policy: Path, **kwargs: object) -> RunningGate:
        gate = RunningGate(policy, [fake_dns.nameserver], **kwargs)  # type: ignore[arg-type]
        gates.append(gate.start())
        return gate

    yield start
    for gate in gates:
        gate.stop()


@pytest.fixture(scope="session", autouse=True)
def _require_curl() -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is required by the integration tests (.ci/run installs it)")
