"""``egress run -- CMD``: run a command whose only network route is the gate.

Order matters for failing closed: the policy is loaded and the sandbox is built (listeners inside,
checked) *before* anything else, and the command is released only once something holds those
listeners to serve them: a running gate that has accepted them, or this process about to start its
private gate on them (once the run's evidence sinks, if any, have opened). Any failure before the
release tears the sandbox down and the command never runs (exit 125); a private gate that then fails
to start kills the sandbox, whose connections never got past the listeners' queues (exit 125 too).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sys

from proxy.core.sandbox_id import check_sandbox_id
from proxy.sandbox import (
    DEFAULT_DNS_PORT,
    DEFAULT_PROXY_PORT,
    EXIT_SETUP_FAILED,
    SANDBOX_LOOPBACK,
)
from proxy.sandbox.env import ProxyAddress, proxy_environment
from proxy.sandbox.gatedir import runtime_dir
from proxy.sandbox.installation import installation_paths, within
from proxy.sandbox.namespace import Listener, Sandbox, SandboxError, SandboxSpec, exit_code
from proxy.sandbox.signals import forwarding_signals
from proxy.sandbox.stdio import foreground_tty, restore_tty, stdio_fds, stdio_problem

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:  # a private gate's types: the joined modes do not import them (nor the evidence
    # and summary modules, which load the policy model: see tests/proxy/sandbox/test_startup.py)
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path
    from typing import IO, Any

    from proxy.credentials.sandbox import Provided
    from proxy.evidence.emit import Emitter, Sink
    from proxy.sandbox.private_gate import GateStarter, PrivateGate, Trust, TrustSetup
    from proxy.sandbox.summary import SummarySink
    from proxy.sandbox.usergate import Session

NO_ISOLATION_WARNING = """\
egress: WARNING: --no-isolation: the command runs WITHOUT a network namespace.
egress: WARNING: HTTP(S)_PROXY is only a request: anything that ignores it reaches the network directly.
egress: WARNING: use this for debugging only, never for untrusted code."""


class RunOptions:
    """How to run one command. A plain class, not a dataclass: a launch that hands the sandbox to a
    running gate imports neither dataclasses nor inspect (~10 ms of every `egress run`)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        policy_path: str | Path | None = None,
        proxy_url: str | None = None,
        sandbox_id: str | None = None,
        quiet: bool = False,
        isolation: bool = True,
        nameservers: Sequence[str] | None = None,
        hosts_file: str | None = "/etc/hosts",
        state_dir: str | None = None,
        decision_log: str | None = None,
        journal: str | None = None,
        proxy_port: int = DEFAULT_PROXY_PORT,
        json: bool = False,
        dns_port: int | None = DEFAULT_DNS_PORT,
        dns_target: tuple[str, int] | None = None,
        gate_socket: str | None = None,
        token: str | None = None,
        gate: GateStarter | None = None,
        trust: TrustSetup | None = None,
        credentials: Callable[[Any, str], Provided] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        sinks: Sequence[Sink] = (),
        evidence: Callable[[list[Sink]], Any] | None = None,
        on_ready: Callable[[Sandbox], None] | None = None,
        on_gate: Callable[[PrivateGate], None] | None = None,
        summary: SummarySink | None = None,
        managed_policy: str | None = None,
        summary_format: str = "text",
        context: dict[str, str] | None = None,
        traceparent: str | None = None,
        reuse_gate: bool = False,
        also_hidden: Sequence[str] = (),
        gate_modules: Sequence[str] = (),
    ) -> None:
        self.argv = argv
        self.policy_path = policy_path
        self.proxy_url = proxy_url
        self.sandbox_id: str | None = sandbox_id if sandbox_id is not None else new_sandbox_id()
        self.quiet = quiet
        self.isolation = isolation
        self.nameservers = nameservers
        self.hosts_file = hosts_file
        self.state_dir = state_dir
        # A file, "-" for stderr, None for none (the summary suffices).
        self.decision_log = decision_log
        self.journal = journal  # the private gate's audit journal (kept read-only inside)
        self.proxy_port = proxy_port
        self.json = json  # announce pending approvals as JSON lines
        self.dns_port = dns_port
        self.dns_target = dns_target  # joined mode: where to relay DNS (unset: no DNS)
        self.gate_socket = gate_socket  # hand the listeners to a local gate (no relay)
        self.token = token  # the sandbox's credential for a gate that requires one
        self.gate = gate  # starts the private gate (without --proxy / --gate-socket)
        self.trust = trust  # the CA bundle and hidden paths when the gate reads TLS
        # Credentials the sandbox gets placeholders for (private gate only): given the policy and the
        # sandbox id, what to set, remove and hide; raises ValueError (lines to print) when they fail.
        self.credentials = credentials
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.sinks = sinks
        # The evidence sinks (journal, OTel, metrics) around the given ones, for a private gate; a
        # callable so that they are imported and opened only when one starts.
        self.evidence = evidence
        self.on_ready = on_ready  # tests/doctor: the private gate serves (the command may run)
        self.on_gate = on_gate  # doctor: the private gate is serving
        self.summary = summary  # the private gate's decision counts (made on start)
        self.managed_policy = managed_policy  # the organisation's ceiling (proxy.policy.managed)
        self.summary_format = summary_format  # or "json": one JSON object on stderr at exit
        self.context: dict[str, str] = context if context is not None else {}  # --context KEY=VALUE
        self.traceparent = traceparent  # the agent's W3C trace context (validated by the CLI)
        # Hand the sandbox to this user's shared gate when it can serve the run as a private gate
        # would (proxy.sandbox.usergate); the caller sets it only for runs with nothing else to serve.
        self.reuse_gate = reuse_gate
        # More paths the sandbox must not see whichever gate serves it (this user's own gate state
        # when the shared gate, whose state is elsewhere, serves the run).
        self.also_hidden = tuple(also_hidden)
        # The modules ``gate`` imports, in import order: a private gate loads them a step at a time
        # while its sandbox comes up and its command starts (names only: this layer imports none).
        self.gate_modules = tuple(gate_modules)


def new_sandbox_id() -> str:
    return f"sbx-{os.urandom(4).hex()}"


def _err(message: str) -> None:
    sys.stderr.write(f"egress run: {message}\n")
    sys.stderr.flush()


def run(options: RunOptions) -> int:
    """Run the command; return its exit status (128+N if killed by signal N, 125 if set-up failed)."""
    if not options.argv:
        _err("no command given (usage: egress run [OPTIONS] -- CMD [ARGS...])")
        return EXIT_SETUP_FAILED
    try:
        check_sandbox_id(str(options.sandbox_id))
    except ValueError as exc:
        _err(f"{exc}; the command was not run")
        return EXIT_SETUP_FAILED
    if options.proxy_url is not None and options.gate_socket is not None:
        _err("--proxy and --gate-socket are alternatives; the command was not run")
        return EXIT_SETUP_FAILED
    policy: Any = None
    private = options.proxy_url is None and options.gate_socket is None
    session: Session | None = None
    if private and options.reuse_gate and options.isolation and options.credentials is None:
        reused = _user_gate(options)
        if isinstance(reused, int):
            return reused
        session = reused
        private = session is None
    if private:
        if options.gate is None:
            _err("no gate to start (RunOptions.gate is unset); the command was not run")
            return EXIT_SETUP_FAILED
        from proxy.runtime import codecache

        codecache.install()  # before the policy's and the gate's classes are defined
        from proxy.policy.managed import load_effective
        from proxy.policy.model import PolicyError

        try:
            policy = load_effective(options.policy_path, options.managed_policy)
        except PolicyError as exc:
            *problems, verdict = exc.lines()
            for line in problems:
                _err(line)
            _err(f"{verdict}; the command was not run")
            return EXIT_SETUP_FAILED
        links = relinkable(policy)
        if links:
            _err(
                f"the policy is read through the symbolic link {links[0]}, in a directory the "
                "command could write: it could point the link at a file of its own and widen the "
                f"next run's policy. Name the file it points to ({os.path.realpath(links[0])}) "
                "instead, in --policy or in the include that names it, or keep the link where "
                "the command cannot write; the command was not run"
            )
            return EXIT_SETUP_FAILED
    trust: Trust | None = None
    if options.trust is not None or session is not None:
        try:
            if session is not None:
                trust = session.trust()
            elif options.trust is not None:
                trust = options.trust(policy)
        except ValueError as exc:
            if session is not None:
                session.close()
            _err(f"{exc}; the command was not run")
            return EXIT_SETUP_FAILED
    provided: Provided | None = None
    try:
        if options.credentials is not None:
            if not private or not options.isolation:
                _err(
                    "--credentials needs this command's own isolated gate (not --proxy, "
                    "--gate-socket or --no-isolation: there the command could read the real "
                    "values); the command was not run"
                )
                return EXIT_SETUP_FAILED
            try:
                provided = options.credentials(policy, str(options.sandbox_id))
            except ValueError as exc:
                for line in str(exc).splitlines():
                    _err(line)
                _err("the command was not run")
                return EXIT_SETUP_FAILED
        return _run_with(options, policy, trust, provided, session)
    finally:  # the CA bundle written for the sandbox goes, whether or not the command ran
        if trust is not None:
            trust.cleanup()
        if provided is not None:
            provided.cleanup()


def _user_gate(options: RunOptions) -> Session | int | None:
    """This user's gate, checked to serve the run's policy; None: start a private gate instead; an
    exit status: the policy does not load (the gate's lines say where), so nothing runs."""
    from proxy.sandbox.gatedir import UserGateError
    from proxy.sandbox.usergate import open_session, policy_check

    check = policy_check(
        str(options.policy_path) if options.policy_path is not None else None,
        options.managed_policy,
    )
    try:
        session = open_session(check)
    except UserGateError as exc:
        if not options.quiet:
            _err(f"{exc}; this run starts its own gate")
        return None
    answer = session.answer
    if answer.get("ok"):
        return session
    session.close()
    lines = answer.get("error")
    if isinstance(lines, list) and lines:
        *problems, verdict = (str(line) for line in lines)
        for line in problems:
            _err(line)
        _err(f"{verdict}; the command was not run")
        return EXIT_SETUP_FAILED
    return None  # a fallback: the shared gate cannot serve this policy as a private gate would


def _user_gate_dirs() -> tuple[str, ...]:
    """The per-user gate's directories: hidden in every sandbox, not only those the shared gate
    serves (a sandbox of a run with its own gate runs as the same user while that gate lives)."""
    from proxy.sandbox.gatedir import hidden_dirs

    return hidden_dirs()


def without_runtime_dir(env: dict[str, str], runtime: str) -> dict[str, str]:
    """The command's environment without the variables that point into the hidden runtime
    directory (tools then fall back to /tmp, as without one)."""
    out = dict(env)
    if out.get("XDG_RUNTIME_DIR") and os.path.realpath(out["XDG_RUNTIME_DIR"]) == runtime:
        del out["XDG_RUNTIME_DIR"]
    if runtime in out.get("DBUS_SESSION_BUS_ADDRESS", ""):
        del out["DBUS_SESSION_BUS_ADDRESS"]
    return out


def _run_with(
    options: RunOptions,
    policy: Any,
    trust: Trust | None,
    provided: Provided | None = None,
    session: Session | None = None,
) -> int:
    bundle = trust.bundle if trust is not None else None
    if not options.isolation:
        if options.gate_socket is not None:
            _err("--gate-socket hands over a sandbox: it needs isolation; the command was not run")
            return EXIT_SETUP_FAILED
        sys.stderr.write(NO_ISOLATION_WARNING + "\n")
        return _run_unisolated(options, policy, bundle)
    problem = stdio_problem(stdio_fds(options.stdin, options.stdout, options.stderr))
    if problem:
        _err(f"{problem}; the command was not run")
        return EXIT_SETUP_FAILED
    tty = foreground_tty()
    listeners = [Listener("proxy", "tcp", options.proxy_port)]
    with_dns = options.dns_port is not None and (
        options.proxy_url is None or options.dns_target is not None
    )  # a gate we hand off to decides itself whether it serves DNS
    if with_dns:
        assert options.dns_port is not None
        listeners += [
            Listener("dns-udp", "udp", options.dns_port),
            Listener("dns-tcp", "tcp", options.dns_port),
        ]
    if options.proxy_url is None and options.gate_socket is None:
        # the private gate, or this user's, attributes connections to the sandbox's processes
        listeners.append(Listener("diag", "diag", 0))
    inside = SANDBOX_LOOPBACK
    if options.proxy_url is not None:
        try:
            upstream = ProxyAddress.parse(options.proxy_url)
        except ValueError as exc:
            _err(f"{exc}; the command was not run")
            return EXIT_SETUP_FAILED
        address = ProxyAddress(inside, options.proxy_port, upstream.username, upstream.password)
    else:
        upstream = None
        address = ProxyAddress(inside, options.proxy_port)
    base = dict(options.env if options.env is not None else os.environ)
    base.pop("EGRESS_SANDBOX_TOKEN", None)  # the launcher's to present, not the sandbox's to read
    env = proxy_environment(base, address, sandbox_id=options.sandbox_id, ca_bundle=bundle)
    hidden = tuple(trust.hidden) if trust is not None else ()  # a per-user gate's socket among them
    more = (*_user_gate_dirs(), *options.also_hidden)  # whichever gate serves the sandbox
    runtime = runtime_dir()  # the user's own services' sockets (systemd, D-Bus, agents)
    if runtime is not None:
        more += (runtime,)
        env = without_runtime_dir(env, runtime)
    hidden += tuple(dict.fromkeys(d for d in more if d not in hidden))
    if provided is not None:  # placeholders in, real values and their sources out of reach
        env = provided.apply_to(env)
        hidden += tuple(provided.hidden)
    private = upstream is None and options.gate_socket is None and session is None
    try:
        evidence = evidence_files(options) if private or session is not None else ()
    except OSError as exc:
        _err(f"cannot write {exc.filename}: {exc.strerror or exc}; the command was not run")
        return EXIT_SETUP_FAILED
    if options.gate_socket is not None:
        # Before the fork, not while the helper works: after it, every page the import writes is
        # copied first (the helper and init share them until they exit).
        import proxy.sandbox.handoff  # noqa: F401
    spec = SandboxSpec(
        argv=list(options.argv),
        env=env,
        listeners=listeners,
        cwd=options.cwd,
        foreground_tty=tty,
        hidden=hidden,
        frozen=_visible(
            (
                *installation_paths((options.cwd,) if options.cwd else ()),
                *(read_only_files(policy) if session is None else session.frozen),
                *evidence,
                *_hosts_file(options),
            ),
            hidden,
        ),
        # A rule bound to executables: no process inside may name another file as its own.
        close_userns=(
            bool(getattr(policy, "binds_executables", False)) if session is None else session.binds
        ),
    )
    own = _import_steps(_LAUNCHER_MODULES) if private else None
    try:
        sandbox = Sandbox.spawn(
            spec,
            stdin=options.stdin,
            stdout=options.stdout,
            stderr=options.stderr,
            meanwhile=own,  # the rest of them, then the gate's, once the sandbox is ready
        )
    except SandboxError as exc:
        _err(f"cannot isolate the command, so it was not run: {exc}")
        return EXIT_SETUP_FAILED
    summary = ""
    try:
        if session is not None:
            code, summary = _run_reused(options, sandbox, session)
        elif options.gate_socket is not None:
            code, summary = _run_handed_off(options, sandbox, options.gate_socket)
        elif upstream is not None:
            code, summary = _run_joined(options, sandbox, upstream)
        else:
            assert own is not None
            steps = itertools.chain(own, _import_steps(options.gate_modules))
            code, summary = _run_private_gate(options, sandbox, policy, provided, steps)
    finally:
        sandbox.close_sockets()
        if sandbox.returncode is None and sandbox.proc.poll() is None:
            sandbox.kill()
        restore_tty(tty)  # first: a background process writing to a TOSTOP terminal would stop
    if summary and not options.quiet:
        sys.stderr.write(summary + "\n")
    return code


_LAUNCHER_MODULES = (
    "threading",
    "traceback",
    "logging",
    "concurrent.futures",
    "ssl",
    "subprocess",
    "asyncio",
    "proxy.runtime.loop",
    "proxy.core.decision",
    "proxy.evidence.emit",
    "proxy.sandbox.summary",
)
"""What a private gate's launcher imports next: the event loop, the evidence path. They load while
the helper builds the sandbox, and what is left of them, then the gate's modules, while the command
starts. asyncio's own dependencies come first, in steps of 1-4 ms: the sandbox is ready after ~7 ms,
and its command is released at the first step's end after that (asyncio is one ~11 ms import)."""


def _import_steps(names: Sequence[str]) -> Iterator[None]:
    """Import ``names`` one a step. A name that does not import (missing, or broken) is passed
    over: the gate's start imports what it needs and, when it cannot, fails as a start does
    (the run ends with its error, exit 125)."""
    import importlib

    for name in names:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
        yield


def _run_private_gate(
    options: RunOptions,
    sandbox: Sandbox,
    policy: Any,
    provided: Provided | None,
    steps: Iterator[None],
) -> tuple[int, str]:
    """Serve the sandbox with a gate in this process. With no evidence sink to open (whose errors
    must stop a run before it starts) the command is released at once, and the gate's modules load
    while it starts: what it sends meanwhile waits in the listeners' queues, held by this process,
    until the gate takes it. A command that has ended with nothing queued by the time they have
    loaded never needed the gate, which is then not started (``egress run -- ls`` pays no gate).

    Not so for a policy that binds a rule to executables: the gate names the program behind a
    connection when it takes it, and a queue would widen, from microseconds to the gate's start,
    the window in which a command can connect, send and then ``exec`` the bound program (threat 19,
    which no order closes: docs/attribution.md). Its command is released once the gate serves, as
    every command was before."""
    release = _Release(sandbox, held=policy.binds_executables)
    try:
        if options.evidence is None and not release.held:
            release()
            # looked at after each step, and once more after the last
            if any(_needs_no_gate(sandbox) for _ in steps) or _needs_no_gate(sandbox):
                release.ended()
                sandbox.close_sockets()
                return sandbox.wait(10), render_summary(options)
        else:
            for _ in steps:
                pass
        try:  # the loop the gate runs on, chosen here: one it cannot have stops the run
            from proxy.runtime.loop import loop_factory
            from proxy.runtime.loop import run as run_loop

            loop_factory()
        except Exception as exc:  # EGRESS_EVENT_LOOP refused, the loop's modules broken
            _err(_gate_failed(sandbox, exc))
            return EXIT_SETUP_FAILED, ""
        return run_loop(_run_private(options, sandbox, policy, provided, release))
    finally:
        release.ended()


class _Release:
    """Lets the command run (once: later calls do nothing); signals to the launcher go to it from
    then until the sandbox ends. Before, they stop the launcher and the sandbox with it, as they
    always did; after, nobody is left to take them, and they stop the launcher again. ``held``: the
    command may run only once its gate serves (a policy bound to executables)."""

    def __init__(self, sandbox: Sandbox, *, held: bool) -> None:
        self._sandbox = sandbox
        self.held = held
        self._forwarding = contextlib.ExitStack()

    def __call__(self) -> None:
        if self._sandbox.started:
            return
        self._forwarding.enter_context(forwarding_signals(self._sandbox.send_signal))
        self._sandbox.start()

    def ended(self) -> None:
        self._forwarding.close()


def _gate_failed(sandbox: Sandbox, exc: BaseException) -> str:
    """Tears the sandbox down after its gate failed to start; what the run says: the command was
    not run, was stopped, or had ended (it was released before the gate served)."""
    released = sandbox.started
    ended = released and sandbox.ended()
    sandbox.abort()
    if not released:
        return f"the gate did not start, so the command was not run: {exc}"
    if ended:
        return (
            f"the gate did not start; the command had ended (status {sandbox.returncode}), and "
            f"anything it left for the gate was never decided nor let out: {exc}"
        )
    return (
        "the gate did not start, so the command was stopped (nothing it sent had left the "
        f"sandbox): {exc}"
    )


def _needs_no_gate(sandbox: Sandbox) -> bool:
    """The sandbox has ended (nothing inside can connect any more) and left nothing queued."""
    return sandbox.ended() and not sandbox.waiting()


def read_only_files(policy: Any) -> tuple[str, ...]:
    """What the sandbox must not rewrite, even when it runs as the files' owner: the files the
    policy's rules and its managed ceiling's rules are bound to (a report is held to the managed
    rule's executables), and the files the policy was read from (the policy, each include, the
    ceiling), which a command that rewrote them would widen the next run's policy with."""
    if policy is None:
        return ()
    ceiling = policy.ceiling
    sources = (*policy.files, *(ceiling.files if ceiling is not None else ()))
    executables = (e.path for rule in policy.every_rule for e in rule.executables)
    return tuple(dict.fromkeys((*executables, *map(str, sources))))


def relinkable(policy: Any) -> tuple[str, ...]:
    """Symbolic links on the paths the policy's files were named by (the policy, each include, the
    ceiling) that sit in a directory the command could write. A read-only bind mount keeps a file
    from being rewritten and a pinned directory from being renamed, but a link can be neither: a
    command could point one at a file of its own and widen the next run's policy."""
    if policy is None:
        return ()
    ceiling = policy.ceiling
    named = (*policy.named, *(ceiling.named if ceiling is not None else ()))
    # Joined to the working directory as given, not normalised: ``link/..`` is the link's target's
    # parent to the kernel, which ``abspath`` would fold away by text.
    here = os.getcwd()
    found = [
        link for path in named for link in _links_on(os.path.join(here, path)) if _movable(link)
    ]
    return tuple(dict.fromkeys(found))


def _movable(link: str) -> bool:
    """Whether the command (this user, with no capabilities) could replace ``link``: its directory
    is on a writable mount and its mode lets this user write it (a sticky directory: only a link
    this user owns, or in a directory this user owns). By the mode bits, not ``access()``: root's
    capabilities, which ``access()`` counts, are not the command's."""
    directory = os.path.dirname(link)
    try:
        st = os.stat(directory)
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return False
        owner = os.lstat(link).st_uid
    except OSError:
        return True  # cannot tell: counted as movable (the run does not start)
    uid = os.getuid()
    if st.st_uid == uid:
        writable = bool(st.st_mode & 0o200)
    elif st.st_gid in {os.getgid(), *os.getgroups()}:
        writable = bool(st.st_mode & 0o020)
    else:
        writable = bool(st.st_mode & 0o002)
    if writable and st.st_mode & 0o1000:  # sticky: only one's own entries
        return uid in (owner, st.st_uid)
    return writable


def _links_on(path: str) -> list[str]:
    """Every symbolic link the kernel follows to reach ``path``, component by component, through
    the links' own targets (a chain of at most 40, as the kernel allows)."""
    links: list[str] = []
    for _ in range(40):
        parts = [part for part in path.split("/") if part]
        current = "/"
        for index, part in enumerate(parts):
            candidate = os.path.join(current, part)
            if os.path.islink(candidate):
                links.append(candidate)
                target = os.path.join(os.path.dirname(candidate), os.readlink(candidate))
                path = os.path.join(target, *parts[index + 1 :])
                break
            current = candidate
        else:
            return links
    return links


def _hosts_file(options: RunOptions) -> tuple[str, ...]:
    """A hosts file of the run's own (``--hosts-file``), which the gate reads again whenever it
    changes: read-only inside, as /etc/hosts is in every sandbox."""
    path = options.hosts_file
    if not path or os.path.abspath(path) == "/etc/hosts" or not os.path.isfile(path):
        return ()
    return (os.path.abspath(path),)


def evidence_files(options: RunOptions) -> tuple[str, ...]:
    """The files this run's gate writes its evidence to (the audit journal, the decision log),
    created now as their writers would create them, so that they are read-only inside the sandbox:
    a command running as their owner could otherwise drop its own refusals and recompute the
    journal's hash chain (which has no key). OSError (naming the file) when one cannot be created:
    the run stops before its command starts, as it did when the gate opened them first."""
    wanted = [(options.journal, 0o600), (options.decision_log, 0o600)]
    found: list[str] = []
    for path, mode in wanted:
        if not path or path == "-":
            continue
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode))
        found.append(path)
    return tuple(found)


def _visible(paths: tuple[str, ...], hidden: tuple[str, ...]) -> tuple[str, ...]:
    """``paths`` minus those under a hidden path: the sandbox cannot reach those at all."""
    if not paths or not hidden:
        return paths
    covered = [os.path.realpath(h) for h in hidden]
    real = {p: os.path.realpath(p) for p in paths}
    return tuple(p for p in paths if not any(within(real[p], h) for h in covered))


def _summary(options: RunOptions) -> SummarySink:
    if options.summary is None:
        from proxy.sandbox.summary import SummarySink

        options.summary = SummarySink()
    return options.summary


def _sinks(options: RunOptions) -> list[Sink]:
    from proxy.evidence.emit import JsonLineSink

    sinks: list[Sink] = [_summary(options), *options.sinks]
    if options.decision_log == "-":
        sinks.append(JsonLineSink(stream=sys.stderr))
    elif options.decision_log:
        sinks.append(JsonLineSink(path=options.decision_log))
    return sinks


async def _run_private(
    options: RunOptions,
    sandbox: Sandbox,
    policy: Any,
    provided: Provided | None,
    release: _Release,
) -> tuple[int, str]:
    """The gate runs in this process and accepts on the sandbox's own listeners: no relay.
    ``release`` lets the command run, if that has not been done. Returns the exit status and the
    summary to print."""
    from proxy.evidence.emit import Emitter
    from proxy.sandbox.private_gate import GateRequest

    assert options.gate is not None
    evidence: Any = None
    emitter: Emitter | None = None
    gate: PrivateGate | None = None
    try:
        evidence = options.evidence(_sinks(options)) if options.evidence else None
        emitter = evidence.emitter if evidence else Emitter(_sinks(options))
        if evidence is not None:
            await _maybe_await(evidence.start())
            if evidence.metrics_url is not None and not options.quiet:
                _err(f"metrics on {evidence.metrics_url}")  # --metrics HOST:0 picked the port
        if not release.held:
            release()  # the sinks are open: the command starts while the gate does
        gate = await options.gate(
            GateRequest(
                policy,
                emitter,
                evidence,
                options.nameservers,
                str(options.sandbox_id),
                hosts_file=options.hosts_file,
                state_dir=options.state_dir,
                sockets=sandbox.sockets,
                json_notices=options.json,
                credentials=provided.store if provided is not None else None,
                sandbox_pid=sandbox.pid,
                proxy_port=options.proxy_port,
                facts=sandbox_facts(options),
                trust_prepared=options.trust is not None,
            )
        )
        if options.on_gate:
            options.on_gate(gate)
    except Exception as exc:
        import logging

        logging.getLogger("egress.run").debug("gate start-up failed", exc_info=True)
        _err(_gate_failed(sandbox, exc))
        await _stop(gate, evidence, emitter)
        return EXIT_SETUP_FAILED, ""
    try:
        code = await _serve_until_exit(sandbox, gate, release, options.on_ready)
    finally:
        await _stop(gate, evidence, emitter)
    return code, render_summary(options)


def render_summary(options: RunOptions) -> str:
    if options.summary_format == "json":
        return _summary(options).render_json(str(options.sandbox_id))
    return _summary(options).render(str(options.sandbox_id))


def sandbox_facts(options: RunOptions) -> Any:
    """The launching user, the --context and the TRACEPARENT every decision of this run carries."""
    from proxy.attribution.stamp import SandboxFacts, user_name
    from proxy.attribution.traceparent import InvalidTraceparent, parse

    uid = os.getuid()
    trace = None
    if options.traceparent:
        try:
            trace = parse(options.traceparent)
        except InvalidTraceparent as exc:
            _err(f"warning: TRACEPARENT ignored: {exc}")
    return SandboxFacts(uid, user_name(uid), dict(options.context), trace)


async def _stop(gate: PrivateGate | None, evidence: Any, emitter: Emitter | None) -> None:
    if gate is not None:
        with contextlib.suppress(Exception):
            await gate.stop()
    if evidence is not None:
        with contextlib.suppress(Exception):
            await _maybe_await(evidence.close())
    elif emitter is not None:
        emitter.close()


async def _maybe_await(result: Any) -> None:
    import inspect

    if inspect.isawaitable(result):
        await result


LEFT_GRACE = 5.0
"""Seconds the gate has, once the sandbox has ended, for what it left: connections and datagrams
still queued on the listeners, connections and questions taken and not yet decided. Longer than
an upstream DNS lookup may take (3 s), so that a name still resolving is decided and recorded."""


async def _serve_until_exit(
    sandbox: Sandbox,
    gate: PrivateGate,
    release: _Release,
    on_ready: Callable[[Sandbox], None] | None = None,
) -> int:
    """Wait for the released sandbox to exit without blocking the gate's loop; its status. What it
    sent before the gate served, or just before its end, is then taken and decided, so that the
    attempt is recorded: its processes are gone, so each such connection ends once decided (within
    ``LEFT_GRACE`` seconds; past that the gate's stop closes the rest, and the run says how many).
    Its pending approvals close first: nobody is left to use an answer."""
    import asyncio

    from proxy.runtime.loop import gate_started

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    pidfd = os.pidfd_open(sandbox.pid)
    loop.add_reader(pidfd, exited)
    try:
        if on_ready:
            on_ready(sandbox)
        gate_started()
        release()  # a policy bound to executables: released once its gate serves
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    release.ended()
    await gate.sandbox_ended()
    deadline = loop.time() + LEFT_GRACE
    while loop.time() < deadline:
        if not (sandbox.waiting() or gate.in_flight()):
            await asyncio.sleep(0)  # a connection accepted in this turn starts its task in the next
            if not (sandbox.waiting() or gate.in_flight()):
                break
        await asyncio.sleep(0.005)
    else:
        queued = " (more still queued on the listeners)" if sandbox.waiting() else ""
        _err(
            f"warning: {gate.in_flight()} connection(s) or DNS question(s) the command left were "
            f"still open {LEFT_GRACE:g} s after it ended{queued}, and were closed: any not yet "
            "decided was not recorded"
        )
    return sandbox.wait(10)


def _run_joined(options: RunOptions, sandbox: Sandbox, upstream: ProxyAddress) -> tuple[int, str]:
    """A shared gate elsewhere: relay the sandbox's listeners to it from the host namespace."""
    from proxy.sandbox.bridge import Relay, UdpRelay

    proxy = Relay(sandbox.sockets["proxy"], (upstream.host, upstream.port)).start()
    relays: list[Relay | UdpRelay] = [proxy]
    if options.dns_target is not None and "dns-tcp" in sandbox.sockets:
        relays.append(Relay(sandbox.sockets["dns-tcp"], options.dns_target).start())
        relays.append(UdpRelay(sandbox.sockets["dns-udp"], options.dns_target).start())
    try:
        code = _release_and_wait(options, sandbox, sandbox.wait)
    finally:
        for relay in relays:
            relay.close()
    stats = proxy.stats
    summary = (
        f"egress: sandbox {options.sandbox_id}: {stats.accepted} connection(s) relayed to the "
        f"gate at {upstream.hostport}"
        + (f", {stats.refused} over the connection limit" if stats.refused else "")
        + (f", {stats.failed} could not reach it" if stats.failed else "")
        + "; its decision log has the details"
    )
    return code, summary


def _run_handed_off(options: RunOptions, sandbox: Sandbox, path: str) -> tuple[int, str]:
    """A gate on this machine takes the sandbox's listeners itself (see handoff.py): no relay."""
    from proxy.sandbox.handoff import HandoffError, hand_off

    try:
        conn, accepted = hand_off(
            path, str(options.sandbox_id), sandbox.sockets, token=options.token
        )
    except HandoffError as exc:
        sandbox.abort()
        _err(f"{exc}; the command was not run")
        return EXIT_SETUP_FAILED, ""
    sandbox.close_sockets()  # the gate holds its own copies now
    watch = GateWatch(conn, sandbox, path)
    try:
        code = _release_and_wait(options, sandbox, watch.wait)
    finally:
        watch.done()  # and closing the connection makes the gate close this sandbox's listeners
    if watch.lost:
        return (
            EXIT_SETUP_FAILED,
            f"egress: sandbox {options.sandbox_id}: the gate at {path} went away",
        )
    summary = (
        f"egress: sandbox {options.sandbox_id}: served by the gate at {path} "
        f"({', '.join(accepted)}); its decision log has the details"
    )
    return code, summary


def _release_and_wait(options: RunOptions, sandbox: Sandbox, wait: Callable[[], int]) -> int:
    """Start the command of a sandbox a gate elsewhere now serves; its exit status, from ``wait``
    (``sandbox.wait``, or a ``GateWatch``'s, which stops the sandbox if that gate goes away)."""
    with forwarding_signals(sandbox.send_signal):
        if options.on_ready:
            options.on_ready(sandbox)
        sandbox.start()
        return wait()


def _run_reused(options: RunOptions, sandbox: Sandbox, session: Session) -> tuple[int, str]:
    """This user's gate takes the sandbox's listeners with the run's own policy, and sends the
    run's summary back when the sandbox has ended."""
    from proxy.sandbox.handoff import HandoffError

    files: dict[str, int] = {}
    try:
        if options.decision_log:  # a file (the CLI leaves stderr's log to a gate of its own)
            files["decision-log"] = os.open(
                options.decision_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        warnings = session.hand_off(
            str(options.sandbox_id),
            sandbox.sockets,
            None if options.quiet else options.summary_format,
            sandbox_pid=sandbox.pid,
            context=dict(options.context),
            traceparent=options.traceparent,
            files=files,
        )
    except (HandoffError, OSError) as exc:
        session.close()
        sandbox.abort()
        _err(f"{exc}; the command was not run")
        return EXIT_SETUP_FAILED, ""
    finally:
        for fd in files.values():  # the gate has its own copy now (or none: refused)
            os.close(fd)
    sandbox.close_sockets()  # the gate holds its own copies now
    for warning in warnings:
        _err(f"warning: {warning}")
    watch = GateWatch(session.conn, sandbox, session.path)
    summary = ""
    try:
        code = _release_and_wait(options, sandbox, watch.wait)
    finally:
        if watch.lost or options.quiet:
            session.close()  # no summary to wait for: closing ends the sandbox's service there
        else:
            summary = session.finish()  # the half-close ends it, and the summary comes back
    if watch.lost:
        return (
            EXIT_SETUP_FAILED,
            f"egress: sandbox {options.sandbox_id}: the gate at {session.path} went away",
        )
    return code, summary


class GateWatch:
    """Waits for the sandbox while watching for a hand-off gate that goes away.

    The listeners then live in no process any more, so the sandbox has no route (connections to its
    proxy are refused): nothing leaks. But nothing records either, so the command is stopped
    (SIGTERM, then SIGKILL after a grace period) and ``egress run`` says so and exits 125 rather than
    let an agent carry on unobserved. The gate never writes on the connection after its answer:
    end-of-file (or an error) on it means the gate process is gone.

    One ``poll`` in the launcher's own thread waits for both the sandbox's end (its helper's pidfd)
    and the gate's: no thread to start and join on every run (docs/startup.md). Signals forwarded
    to the command interrupt it and it resumes (PEP 475)."""

    GRACE = 10.0

    def __init__(self, conn: socket.socket, sandbox: Sandbox, path: str) -> None:
        self.conn = conn
        self.sandbox = sandbox
        self.path = path
        self.lost = False

    def wait(self) -> int:
        """The sandbox's exit status, once its helper has exited."""
        import select
        import time

        pidfd = os.pidfd_open(self.sandbox.pid)  # readable once the helper has exited
        try:
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            waiter.register(self.conn, select.POLLIN)
            kill_at: float | None = None
            while True:
                timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic()) * 1000
                ready = {fd for fd, _ in waiter.poll(timeout)}
                if pidfd in ready:
                    break
                if self.conn.fileno() in ready and not self._gate_alive():
                    waiter.unregister(self.conn)
                    self._lose()
                    kill_at = time.monotonic() + self.GRACE
                elif kill_at is not None and time.monotonic() >= kill_at:
                    self.sandbox.send_signal(signal.SIGKILL)
                    kill_at = None
        finally:
            os.close(pidfd)
        return self.sandbox.wait()

    def _gate_alive(self) -> bool:
        """The connection is readable: end-of-file or an error means the gate is gone (it never
        writes; a byte it did send would be ignored)."""
        try:
            return bool(self.conn.recv(1))
        except OSError:
            return False

    def _lose(self) -> None:
        self.lost = True
        _err(
            f"the gate at {self.path} went away while the sandbox ran: the sandbox has had no "
            "network route since, and nothing records its actions; stopping the command"
        )
        self.sandbox.send_signal(signal.SIGTERM)

    def done(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def _run_unisolated(options: RunOptions, policy: Any, bundle: str | None) -> int:
    """--no-isolation: the same gate and environment, no namespace. Loudly not a boundary."""
    import subprocess

    if options.proxy_url is not None:
        address = ProxyAddress.parse(options.proxy_url)
        env = proxy_environment(
            options.env or os.environ, address, sandbox_id=options.sandbox_id, ca_bundle=bundle
        )
        proc = subprocess.Popen(list(options.argv), env=env, cwd=options.cwd)
        with forwarding_signals(proc.send_signal):
            return exit_code(proc.wait())
    from proxy.runtime.loop import run as run_loop

    return run_loop(_run_unisolated_private(options, policy, bundle))


async def _run_unisolated_private(options: RunOptions, policy: Any, bundle: str | None) -> int:
    import asyncio

    from proxy.evidence.emit import Emitter
    from proxy.sandbox.private_gate import GateRequest

    assert options.gate is not None
    emitter = Emitter(_sinks(options))
    gate = await options.gate(
        GateRequest(
            policy,
            emitter,
            None,
            options.nameservers,
            str(options.sandbox_id),
            hosts_file=options.hosts_file,
            state_dir=options.state_dir,
            host_listener_is_sandbox=True,
            json_notices=options.json,
            facts=sandbox_facts(options),
        )
    )
    try:
        host, port = gate.listen_address
        env = proxy_environment(
            options.env or os.environ,
            ProxyAddress(host, port),
            sandbox_id=options.sandbox_id,
            ca_bundle=bundle,
        )
        proc = await asyncio.create_subprocess_exec(
            *options.argv,
            env=env,
            cwd=options.cwd,
            stdin=options.stdin,
            stdout=options.stdout,
            stderr=options.stderr,
        )
        with forwarding_signals(proc.send_signal):
            status = await proc.wait()
    finally:
        await gate.stop()
        emitter.close()
    if not options.quiet:
        sys.stderr.write(render_summary(options) + "\n")
        sys.stderr.write("egress: WARNING: this run was NOT isolated (--no-isolation)\n")
    return exit_code(status)
