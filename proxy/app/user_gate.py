"""The per-user gate, gate side: serves sandboxes handed over by ``egress run --reuse-gate``, each
with the policy its own run named (:mod:`proxy.sandbox.usergate` says who starts it and who may use
it).

Nothing is served that a run did not name. The gate's own TCP listener (which every gate has) serves
no sandbox and its policy has no rule, so anything that connects to it is refused. A sandbox's
policy is loaded (from the files its launcher named, under the managed ceiling it named) when the
launcher checks it and again when the listeners arrive, and it holds for that sandbox's whole life:
like a private gate, this gate does not reload a run's policy while the run lasts. The files are
read again whenever one of them, a name the run gave (a symlink re-pointed) or a directory holding
one (an include's symlink re-pointed) changed (inode, size, modification or change time), else the
loaded policy is reused. A policy this gate cannot serve as a private gate would is answered with a
fallback, and the run starts its own gate: ask rules (their approvals belong to the run's terminal).

Each sandbox's processes are seen as a private gate sees them: through the sandbox's own sock_diag
socket and under its helper's pid, both handed over with the listeners and checked to be in the
sandbox's network namespace; so decisions name the process, and rules bound to executables hold. The
executables such rules name are returned by the check, and the launcher makes them read-only inside
the sandbox (as for a private gate); a hand-off whose policy binds any other file is refused.

Only a process in the gate's own network namespace may talk to it (a launcher; never a sandboxed
process, whichever gate its own run has), and a run whose environment would start a gate
differently (:data:`proxy.sandbox.usergate.SHAPING`: its presets directory, the CA files OpenSSL
reads, the event loop) gets its own gate.

When a run's launcher half-closes its connection (the sandbox has ended), the gate writes back the
run's summary, counted from that sandbox's decisions only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.attribution.channel import open_channel
from proxy.attribution.stamp import SandboxFacts, Stamped, user_name
from proxy.core.decision import Decision
from proxy.evidence.emit import JsonLineSink
from proxy.policy.model import Action, Mode, Policy, PolicyError
from proxy.runtime.lazy import all_settled
from proxy.runtime.loop import gate_settled, gate_started
from proxy.runtime.threads import in_daemon_thread
from proxy.sandbox.gatedir import UserGateError, private_dir
from proxy.sandbox.handoff import CHECK_TIMEOUT, Detach, HandoffError
from proxy.sandbox.launcher import read_only_files, relinkable
from proxy.sandbox.summary import SummarySink
from proxy.sandbox.usergate import (
    CODE,
    IDLE_EXIT,
    PID_NAME,
    SOCKET_NAME,
    open_private,
    shaping,
)

log = logging.getLogger("egress.user-gate")

# The gate's own listener serves nobody: no rule, so every connection to it is refused.
NOBODY = Policy(version="per-user-gate: no sandbox", mode=Mode.ENFORCE, rules=())
IDLE_CHECK = 1.0  # seconds between looks at whether the gate is idle
# A file whose change time is this close to a load (or after it) is not remembered as loaded: its
# time stamps may be too coarse to tell an edit during the load from one before it.
RACY_NS = 2_000_000_000


class Unservable(Exception):
    """This gate cannot serve the policy as a private gate would: the run should start its own."""


@dataclass(frozen=True)
class _Loaded:
    policy: Policy
    # every file read: path, inode, size, mtime and ctime (which no one can set back)
    signature: tuple[tuple[str, int, int, int, int], ...]


def _signature(paths: list[Path]) -> tuple[tuple[str, int, int, int, int], ...]:
    out = []
    for path in paths:
        info = os.stat(path)
        out.append((str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(out)


def _watched(local: str | None, managed: str | None, policy: Policy) -> list[Path]:
    """What a remembered policy depends on: every file read (symlinks resolved), the names the run
    gave (a symlink re-pointed at another release leads elsewhere), and the directory of each (an
    include's symlink, re-pointed, changes its directory)."""
    from proxy.policy.loader import policy_file

    named = [policy_file(local)] + ([Path(managed)] if managed is not None else [])
    files = [*named, *policy.files, *(policy.ceiling.files if policy.ceiling else ())]
    return list(dict.fromkeys([*files, *(f.parent for f in files)]))


class RunPolicies:
    """The policies of the runs this gate serves: loaded per run, cached while their files are
    unchanged, registered for a sandbox while it is attached."""

    def __init__(
        self,
        gate: Any,
        inner_attach: Any,
        trust: dict[str, Any] | None = None,
        state: Path | None = None,
        attached: dict[str, Run] | None = None,
    ) -> None:
        self.gate = gate
        self.inner_attach = inner_attach
        # For the launcher: the state directory to hide, the CA files a sandbox trusts.
        self.trust = trust or {}
        self.state = state  # where `egress context SANDBOX` finds a run's channel (None: none)
        # The attached sandboxes' own evidence, shared with the gate's emitter and sinks.
        self.attached: dict[str, Run] = attached if attached is not None else {}
        self._cache: dict[tuple[str | None, str | None], _Loaded] = {}
        self._lock = threading.Lock()  # checks load in threads

    def load(self, body: dict[str, Any]) -> Policy:
        """The run's policy; PolicyError when it does not load, Unservable when this gate cannot
        serve it, HandoffError when the request is malformed."""
        if body.get("code") != CODE:
            raise Unservable(f"the running gate is another installation ({CODE})")
        ours = shaping()
        if body.get("env") != ours:  # bare include names, upstream trust, loop: another gate's
            sent = body.get("env")
            theirs: dict[str, Any] = sent if isinstance(sent, dict) else {}
            differ = sorted(set(ours.items()) ^ {(str(k), str(v)) for k, v in theirs.items()})
            names = ", ".join(dict.fromkeys(str(name) for name, _ in differ)) or "settings"
            raise Unservable(f"the running gate was started with other {names}")
        local, managed = body.get("path"), body.get("managed")
        for name, value in (("path", local), ("managed", managed)):
            if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
                raise HandoffError(f"the policy's {name} must be an absolute path")
        key = (local, managed)
        # Files are read without the lock: a run whose policy never finishes loading (a FIFO, a
        # hung mount) holds up its own check only, not every other run's.
        policy = self._cached(key)
        if policy is None:
            started = time.time_ns()
            policy = self._load_files(local, managed)
            try:
                signature = _signature(_watched(local, managed, policy))
            except OSError:
                signature = None
            # A file changed since just before the load may have been read as it was before:
            # remembered, the old policy would pass for the new file (git's "racily clean").
            settled = signature is not None and all(e[-1] < started - RACY_NS for e in signature)
            loaded = _Loaded(policy, signature) if settled and signature is not None else None
            with self._lock:
                if loaded is None:
                    self._cache.pop(key, None)
                else:
                    self._cache[key] = loaded
                if len(self._cache) > 64:  # bounded: the oldest entry goes
                    self._cache.pop(next(iter(self._cache)))
        _servable(policy)  # a remembered policy too
        return policy

    def _cached(self, key: tuple[str | None, str | None]) -> Policy | None:
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            return None
        try:
            if _signature([Path(p) for p, *_ in cached.signature]) == cached.signature:
                return cached.policy
        except OSError:
            pass  # a file is gone: load again, which says so
        return None

    @staticmethod
    def _load_files(local: str | None, managed: str | None) -> Policy:
        from proxy.policy.managed import load_effective

        return load_effective(local, managed)

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer to a launcher's check: whether this gate serves the run's policy, and whether
        the sandbox must trust the gate's CA."""
        try:
            policy = self.load(body)
        except PolicyError as exc:
            return {"ok": False, "error": exc.lines()}
        except Unservable as exc:
            return {"ok": False, "fallback": str(exc)}
        except (HandoffError, OSError) as exc:
            return {"ok": False, "fallback": str(exc)}
        if relinkable(policy):  # the launcher's own load says where, and runs nothing
            return {
                "ok": False,
                "fallback": "the policy is read through a link the command could re-point",
            }
        return {
            "ok": True,
            "inspects": policy.reads_requests,
            "frozen": list(read_only_files(policy)),
            "binds": policy.binds_executables,
            **self.trust,
        }

    async def attach(
        self, sandbox_id: str, sockets: dict[str, socket.socket], request: dict[str, Any]
    ) -> Detach:
        body = request.get("policy")
        if not isinstance(body, dict):
            raise HandoffError("the hand-off names no policy")
        try:
            policy = await in_daemon_thread(self.load, body, timeout=CHECK_TIMEOUT)
        except TimeoutError:
            raise HandoffError(f"the policy did not load within {CHECK_TIMEOUT:g} s") from None
        except PolicyError as exc:
            raise HandoffError("; ".join(exc.lines())) from None
        except Unservable as exc:
            raise HandoffError(str(exc)) from None
        frozen = request.get("frozen")
        unfrozen = set(read_only_files(policy)) - set(frozen if isinstance(frozen, list) else [])
        if unfrozen:  # the policy changed since the check: the sandbox could rewrite these
            raise HandoffError(
                f"the policy needs {', '.join(sorted(unfrozen))} kept read-only, which the sandbox "
                "was not built to do (the policy changed since the check?)"
            )
        if policy.binds_executables and request.get("userns_closed") is not True:
            # A process that creates a user namespace of its own can name any file as its
            # executable (prctl PR_SET_MM_MAP): what a bound rule checks would prove nothing.
            raise HandoffError(
                "the policy binds rules to executables, and the sandbox was not built to refuse "
                "the user namespaces that would let a process name another file as its own (the "
                "policy changed since the check?)"
            )
        checkpoint = self.gate.checkpoint
        policies = checkpoint.connections.sandbox_policies
        if sandbox_id in policies:
            raise HandoffError(f"sandbox {sandbox_id} is already served by this gate")
        facts = _facts(request)
        log_file = _decision_log(request)
        try:
            processes = _processes(sockets, request)
        except BaseException:
            if log_file is not None:
                log_file.close()
            raise
        fmt = request.get("summary")
        run = Run(SummarySink(), Stamped(None, facts, processes), log_file)
        policies[sandbox_id] = lambda: policy
        self.attached[sandbox_id] = run
        if processes is not None:
            checkpoint.sandbox_processes[sandbox_id] = processes
        channel = None

        async def forget() -> None:
            policies.pop(sandbox_id, None)  # a connection still open keeps its own reference
            self.attached.pop(sandbox_id, None)
            checkpoint.release_sandbox(sandbox_id)
            if processes is not None:
                processes.close()
            if log_file is not None:
                log_file.close()
            if channel is not None:
                await channel.close()

        if policy.reads_requests:
            self.gate.warm_layers_on_first_connection()
        try:
            if facts.trace is None and request.get("traceparent"):
                request["gate_warnings"].append("TRACEPARENT ignored: not a W3C traceparent")
            if self.state is not None:
                channel = await open_channel(self.state, sandbox_id, facts)
            inner = await self.inner_attach(sandbox_id, sockets, request)
        except BaseException:
            await forget()
            raise

        async def detach() -> dict[str, Any] | None:
            try:
                await inner()
            finally:
                await forget()
            summary = run.summary
            if fmt == "json":
                return {"summary": summary.render_json(sandbox_id)}
            if fmt == "text":
                return {"summary": summary.render(sandbox_id)}
            return None

        return detach


def _facts(request: dict[str, Any]) -> SandboxFacts:
    """Who runs the sandbox (the kernel's uid for the launcher), its context and its trace."""
    from proxy.attribution.context import merged
    from proxy.attribution.traceparent import InvalidTraceparent, parse

    uid = int(request["peer_uid"])
    raw = request.get("context") or {}
    if not isinstance(raw, dict):
        raise HandoffError("the context is not an object")
    try:
        context = merged({}, [(str(k), str(v)) for k, v in raw.items()])
    except ValueError as exc:
        raise HandoffError(f"context: {exc}") from None
    trace = None
    text = request.get("traceparent")
    if isinstance(text, str) and text:
        with contextlib.suppress(InvalidTraceparent):
            trace = parse(text)
    return SandboxFacts(uid, user_name(uid), context, trace)


def _decision_log(request: dict[str, Any]) -> JsonLineSink | None:
    """The run's decision log: a regular file its launcher opened for appending (a pipe or a
    terminal could stall this gate for every run; the launcher leaves those to a gate of its own)."""
    import fcntl
    import stat

    fd = request.get("gate_files", {}).pop("decision-log", None)
    if fd is None:
        return None
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        os.close(fd)
        raise HandoffError(f"the decision log: {exc}") from None
    writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) and flags & os.O_APPEND
    if not stat.S_ISREG(mode) or not writable:
        os.close(fd)
        raise HandoffError("the decision log is not a regular file open for appending")
    return JsonLineSink(fd=fd)


def _processes(sockets: dict[str, socket.socket], request: dict[str, Any]) -> Any:
    """The sandbox's processes, seen through its own sock_diag socket under the helper's pid, when
    the launcher handed both over; the diag socket, the listener and the pid must all be in the one
    sandbox's network namespace. None: nothing is attributed (rules bound to executables refuse)."""
    from proxy.attribution.procfs import SandboxProcesses
    from proxy.sandbox import SANDBOX_LOOPBACK
    from proxy.sandbox.handoff import DIAG
    from proxy.sandbox.namespace import socket_netns_inode

    diag = sockets.pop(DIAG, None)
    pid = request.get("sandbox_pid")
    if diag is None:
        return None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        diag.close()
        raise HandoffError("the diag socket came without the sandbox's pid")
    listener = sockets["proxy"]
    try:
        theirs = socket_netns_inode(listener)
        same = socket_netns_inode(diag) == theirs == os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError as exc:
        diag.close()
        raise HandoffError(f"cannot check the sandbox's pid {pid}: {exc}") from None
    if not same:
        diag.close()
        raise HandoffError(f"pid {pid} and the diag socket are not in the sandbox's namespace")
    return SandboxProcesses(pid, (SANDBOX_LOOPBACK, listener.getsockname()[1]), diag=diag)


class Run:
    """What one attached sandbox has of its own: its summary, the facts and process lookup every
    decision of it is stamped with, and its decision log (None: it asked for none)."""

    __slots__ = ("log", "stamp", "summary")

    def __init__(self, summary: SummarySink, stamp: Stamped, log: JsonLineSink | None) -> None:
        self.summary = summary
        self.stamp = stamp
        self.log = log


class Stamps:
    """The gate's emitter: each decision gets the facts and process of its own sandbox (a decision
    of no attached sandbox goes on as it is) before the sinks see it."""

    def __init__(self, inner: Any, attached: dict[str, Run]) -> None:
        self.inner = inner
        self.attached = attached

    def emit(self, decision: Decision) -> Decision:
        run = self.attached.get(decision.sandbox_id or "")
        result: Decision = self.inner.emit(run.stamp.stamp(decision) if run else decision)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RunSinks:
    """A sink that counts each decision in its own sandbox's summary, and writes it and each
    connection event to that sandbox's decision log when it has one."""

    def __init__(self, attached: dict[str, Run]) -> None:
        self.attached = attached

    def record(self, decision: Decision) -> None:
        run = self.attached.get(decision.sandbox_id or "")
        if run is not None:
            run.summary.record(decision)
            if run.log is not None:
                run.log.record(decision)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        run = self.attached.get(str(attributes.get("sandbox_id") or ""))
        if run is not None and run.log is not None:
            run.log.event(name, attributes)

    def close(self) -> None:
        pass


def _servable(policy: Policy) -> None:
    for rule in policy.rules:
        where = f"{rule.file}:{rule.line}: rule '{rule.name}'"
        if rule.action is Action.ASK:
            raise Unservable(f"{where} asks for approvals, which need the run's own gate")


def activated_socket(path: str, environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (socket activation: ``LISTEN_PID`` is this process,
    ``LISTEN_FDS=1``, the socket is descriptor 3), checked to be a listening Unix stream socket at
    ``path`` that only this user can connect to; None when none was passed. ValueError otherwise:
    a gate started by a unit that does not match refuses to serve rather than guess."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    if env.get("LISTEN_FDS") != "1":
        raise ValueError(f"LISTEN_FDS={env.get('LISTEN_FDS')!r}: expected one socket")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)  # not for the processes this gate may start
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError("the activated socket is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("the activated socket is not listening")
    bound = sock.getsockname()
    if bound != path:
        raise ValueError(f"the activated socket is {bound!r}, not {path} (the unit's ListenStream)")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path}: mode {mode:o}, expected 600 (the unit's SocketMode=0600)")
    return sock


async def serve(directory: str, ready_fd: int | None, idle: float) -> int:
    from addons.master import Gate, GateConfig
    from proxy.app import statedir
    from proxy.app.ca import ensure_ca, system_bundle, upstream_trust
    from proxy.destinations.dnsgate import DnsGate
    from proxy.destinations.resolver import Resolver
    from proxy.evidence.emit import Emitter
    from proxy.sandbox.handoff import HandoffServer, gate_attacher

    state = statedir.prepare_state_dir(statedir.default_state_dir())
    confdir = statedir.mitmproxy_confdir(state)
    ca = ensure_ca(confdir)
    system = system_bundle()
    trust = {"state": str(state), "trust": [str(p) for p in (system, ca.cert) if p is not None]}
    attached: dict[str, Run] = {}
    emitter: Any = Stamps(Emitter([RunSinks(attached)]), attached)
    resolver = Resolver()
    gate = Gate(
        GateConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            confdir=str(confdir),
            upstream_ca=upstream_trust(confdir, None),
        ),
        lambda: NOBODY,
        emitter,
        resolver,
    )
    policies = gate.checkpoint.connections.sandbox_policies

    def dns_for(sandbox_id: str) -> DnsGate:
        return DnsGate(policies.get(sandbox_id, lambda: NOBODY), resolver, emitter, sandbox_id)

    runs = RunPolicies(gate, gate_attacher(gate, dns_for), trust, state, attached)
    handoff = HandoffServer(
        os.path.join(directory, SOCKET_NAME), runs.attach, check=runs.check, launchers_beside=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    activated = activated_socket(handoff.path)
    try:
        await gate.start(layers=False)
        await handoff.start(activated)
        resolver.warm()  # dnspython, in the background: it outlives this run, others will need it
        DnsGate.warm()
        gate_started()
        log.warning("per-user gate ready: pid %d, %s", os.getpid(), handoff.path)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"R")
                os.close(ready_fd)
        # Unlike `egress serve`, readiness does not wait for that import (the first run waits for
        # readiness): its modules leave the collector's generations later, at a quiet moment.
        warming = asyncio.ensure_future(all_settled(resolver.warmed, DnsGate.warmed))
        try:
            connections, front = gate.checkpoint.connections, gate.tunnels

            def busy() -> int:  # connections open, and tunnels whose tasks are still closing
                return connections.active + len(front.active)

            await _until_idle(handoff, idle, stop, _Settle(warming, busy))
        finally:
            warming.cancel()
    finally:
        await handoff.close()
        await gate.stop()
        emitter.close()
    return 0


class _Settle:
    """The start's last step, taken at the first look that finds the background import ended and
    no launcher, connection or closing tunnel there: :func:`gate_settled` (a collection, then a
    freeze)."""

    def __init__(self, warming: asyncio.Future[None], busy: Callable[[], int]) -> None:
        self.warming: asyncio.Future[None] | None = warming
        self.busy = busy  # connections open and tunnels still being served

    def look(self, launchers: int) -> None:
        warming = self.warming
        if warming is None or not warming.done() or launchers or self.busy():
            return
        self.warming = None
        gate_settled()


async def _until_idle(
    handoff: Any, idle: float, stop: asyncio.Event, settle: _Settle | None = None
) -> None:
    """Returns on a stop signal, or once no launcher has been connected for ``idle`` seconds;
    ``settle`` looks for its quiet moment at each check."""
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_CHECK):
                await stop.wait()
        if stop.is_set():
            return
        if settle is not None:
            settle.look(handoff.serving)
        if handoff.serving:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= idle:
            log.warning("no sandbox for %g s: exiting", idle)
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.app.user_gate")
    parser.add_argument("--dir", required=True, help="the gate's private directory")
    parser.add_argument("--ready-fd", type=int, default=None, help="write R here once ready")
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT, help="seconds idle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from proxy.runtime.loop import run

    try:
        directory = private_dir(args.dir)
    except UserGateError as exc:
        log.error("%s: the per-user gate does not start", exc)
        return 2
    pid_file = os.path.join(directory, PID_NAME)
    fd = open_private(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # never through a symlink
    with open(fd, "w") as out:
        out.write(f"{os.getpid()}\n")
    try:
        return run(serve(directory, args.ready_fd, args.idle_exit))
    except ValueError as exc:  # a socket-activating unit that does not match
        log.error("%s: the per-user gate does not start", exc)
        return 2
    finally:
        with contextlib.suppress(OSError):
            if Path(pid_file).read_text().strip() == str(os.getpid()):
                os.unlink(pid_file)


if __name__ == "__main__":
    raise SystemExit(main())
