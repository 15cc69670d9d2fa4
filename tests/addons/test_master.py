"""The embedded master: lazy-only, extra listeners attribute decisions to their sandbox."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from mitmproxy import exceptions

from addons.master import parse_listen
from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream, curl


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:3128") == ("127.0.0.1", 3128)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":8080") == ("127.0.0.1", 8080)
    for bad in ("3128", "host:", "host:99999", "host:12a"):
        with pytest.raises(ValueError, match="--listen"):
            parse_listen(bad)


@pytest.fixture
def gate(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    fake_dns: FakeDns,
    http_upstream: Upstream,
) -> RunningGate:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    return start_gate(
        write_policy(
            f"""
            version: 1
            allow_internal: [127.0.0.0/8]
            rules:
              - name: t
                hosts: [allowed.test]
                ports: [{http_upstream.port}]
            """
        )
    )


def _on_gate_loop(gate: RunningGate, coro: object) -> object:
    assert gate._loop is not None
    return asyncio.run_coroutine_threadsafe(coro, gate._loop).result(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "kept", "asked", "named"),
    [
        ("connection_strategy", "lazy", "eager", "lazy"),
        ("ssl_insecure", False, True, "ssl_insecure"),
        ("validate_inbound_headers", True, False, "validate_inbound_headers"),
        ("rawtcp", False, True, "rawtcp"),
    ],
)
def test_a_guarded_option_is_refused_at_runtime(
    gate: RunningGate, option: str, kept: object, asked: object, named: str
) -> None:
    """Eager connections, unverified upstreams, unvalidated request heads and raw relays: each
    refused by its guard (``addons/mitm.py``) when set on a running gate, the option left as it
    was."""
    master = gate.gate.master
    assert master is not None
    assert getattr(master.options, option) == kept
    with pytest.raises(exceptions.OptionsError, match=named):
        master.options.update(**{option: asked})
    assert getattr(master.options, option) == kept


def test_extra_listener_attributes_decisions_to_its_sandbox(
    gate: RunningGate, http_upstream: Upstream
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    _on_gate_loop(gate, gate.gate.add_listener(listener, sandbox_id="sbx-7"))

    via_sandbox = curl(f"http://allowed.test:{http_upstream.port}/a", f"http://127.0.0.1:{port}")
    assert via_sandbox.status == 200
    assert gate.decisions[-1].sandbox_id == "sbx-7"

    via_main = curl(f"http://allowed.test:{http_upstream.port}/b", gate.url)
    assert via_main.status == 200
    assert gate.decisions[-1].sandbox_id is None


def test_importing_the_gate_does_not_import_mitmproxy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, addons.master\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy')\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_layers_started_on_demand_serve_the_first_plain_http_request(tmp_path: Path) -> None:
    from addons.master import Gate, GateConfig
    from proxy.destinations.resolver import Resolver
    from proxy.evidence.emit import Emitter, MemorySink
    from proxy.policy.loader import load_policy

    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("version: 1\nrules:\n  - name: t\n    hosts: [allowed.test]\n")
    policy = load_policy(policy_path)
    memory = MemorySink()

    async def scenario() -> tuple[bool, bytes, bool]:
        gate = Gate(
            GateConfig(listen_port=0, confdir=str(tmp_path / "conf")),
            lambda: policy,
            Emitter([memory]),
            Resolver(nameservers=["127.0.0.1:9"], hosts_file=None),
        )
        await gate.start(layers=False)
        try:
            before = gate.layers is None
            reader, writer = await asyncio.open_connection(*gate.listen_address)
            # a request with a body: mitmproxy's (the front end serves only bodiless ones)
            writer.write(
                b"POST http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            writer.close()
            return before, head, gate.layers is not None
        finally:
            await gate.stop()

    before, head, after = asyncio.run(scenario())
    assert before and after
    assert head.startswith(b"HTTP/1.1 403")
    assert [(d.kind, d.host) for d in memory.decisions] == [("http", "denied.test")]


def test_warming_waits_for_the_first_connection(tmp_path: Path) -> None:
    """A gate asked to warm mitmproxy's layers on the first connection does not start them before
    one arrives (a command that never connects never pays for them), and does start them on the
    first connection of any kind, a raw tunnel included."""
    from addons.master import Gate, GateConfig
    from proxy.destinations.resolver import Resolver
    from proxy.evidence.emit import Emitter, MemorySink
    from proxy.policy.loader import load_policy

    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("version: 1\nrules:\n  - name: t\n    hosts: [allowed.test]\n")
    policy = load_policy(policy_path)

    async def scenario() -> tuple[bool, bool]:
        gate = Gate(
            GateConfig(listen_port=0, confdir=str(tmp_path / "conf")),
            lambda: policy,
            Emitter([MemorySink()]),
            Resolver(nameservers=["127.0.0.1:9"], hosts_file=None),
        )
        await gate.start(layers=False)
        gate.warm_layers_on_first_connection()
        try:
            await asyncio.sleep(0.2)
            idle = gate._layers_started is None
            _, writer = await asyncio.open_connection(*gate.listen_address)
            writer.write(b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
            await writer.drain()
            assert gate._layers_started is not None or await _eventually(
                lambda: gate._layers_started is not None
            )
            await asyncio.wait_for(asyncio.shield(gate._layers_started), 60)
            writer.close()
            return idle, gate.layers is not None
        finally:
            await gate.stop()

    idle, started = asyncio.run(scenario())
    assert idle and started


async def _eventually(check: Callable[[], bool]) -> bool:
    for _ in range(200):  # bounded: 10 s
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


def test_a_removed_listener_is_unregistered_before_its_descriptor_is_closed(
    gate: RunningGate, http_upstream: Upstream
) -> None:
    """The accept loop keeps its listener registered between connections: removing it must
    unregister it first, so the descriptor's number can serve the next socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    fd, port = listener.fileno(), listener.getsockname()[1]
    server = _on_gate_loop(gate, gate.gate.add_listener(listener, sandbox_id="sbx-8"))
    for n in range(3):  # several connections, one registration
        got = curl(f"http://allowed.test:{http_upstream.port}/{n}", f"http://127.0.0.1:{port}")
        assert got.status == 200

    async def remove() -> bool:
        loop = asyncio.get_running_loop()
        gate.gate.remove_listener(server)  # type: ignore[arg-type]
        assert listener.fileno() == -1
        # Before the accept loop has even seen its cancellation, nothing is registered for the
        # number any more (removing finds nothing).
        return not loop.remove_reader(fd)

    assert _on_gate_loop(gate, remove())
    assert listener not in gate.gate.tunnels._listening
