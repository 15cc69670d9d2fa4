"""``--credentials FILE``: loading the secrets file for ``egress run`` and ``egress serve``.

Every failure is a ValueError whose lines name the file, line and credential (never a value): the
command then does not start. See docs/credentials.md.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable
    from pathlib import Path
    from typing import Any

    from proxy.credentials.sandbox import Provided
    from proxy.credentials.store import CredentialStore
    from proxy.policy.model import Policy


def add_credentials_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        default=None,
        help="a credentials file (docs/credentials.md): the sandbox gets placeholders, the gate "
        "adds the real values for their bound hosts only",
    )


def load_store(path: str, policy: Policy | None) -> CredentialStore:
    """The credentials declared in ``path``, checked against ``policy`` and with every value read."""
    from proxy.credentials.loader import CredentialsError, load_credentials
    from proxy.credentials.sources import SourceError
    from proxy.credentials.store import CredentialStore

    try:
        return CredentialStore(load_credentials(path, policy))
    except CredentialsError as exc:
        raise ValueError("\n".join(exc.lines())) from None
    except SourceError as exc:
        raise ValueError(f"{path}: {exc}") from None


def sandbox_credentials(path: str | None) -> Any:
    """``RunOptions.credentials`` for ``egress run --credentials PATH`` (None without it)."""
    if path is None:
        return None
    absolute = os.path.abspath(path)

    def setup(policy: Policy | None, sandbox_id: str) -> Provided:
        from proxy.credentials.sandbox import provide

        return provide(load_store(absolute, policy), sandbox_id, absolute)

    return setup


def serve_store(
    path: str, policy: Policy, state_dir: Path, sandbox_ids: Iterable[str]
) -> CredentialStore:
    """``egress serve --credentials``: the store, with placeholders derived (the state directory's
    key) for the gate's anonymous clients and for every sandbox of its ``--sandboxes`` file -
    ``egress credentials env`` prints the same ones for whoever provisions a sandbox."""
    from proxy.credentials.store import placeholder_key

    store = load_store(path, policy)
    try:
        key = placeholder_key(state_dir)
    except OSError as exc:
        raise ValueError(f"the placeholder key: {exc}") from None
    for sandbox_id in (None, *sandbox_ids):
        store.issue(sandbox_id, key)
    return store


def register(subparsers: Any) -> None:
    """``egress credentials check|env``."""
    from proxy.app.arguments import add_policy_option, add_state_dir_option

    parser = subparsers.add_parser(
        "credentials",
        help="check a credentials file, or print a sandbox's placeholders for a shared gate",
        description="Credentials the sandbox never holds (docs/credentials.md).",
    )
    sub = parser.add_subparsers(dest="credentials_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="load a credentials file against the policy; print what each credential is bound to",
        description="Loads FILE against the policy (every problem with file:line). Reads no "
        "value unless --read is given, and never prints one.",
    )
    check.add_argument("file", metavar="FILE")
    add_policy_option(check)
    check.add_argument(
        "--read", action="store_true", help="also read every source (values are never printed)"
    )
    check.set_defaults(func=_cmd_check)
    env = sub.add_parser(
        "env",
        help="print a sandbox's placeholder variables (env-file lines) for `egress serve`",
        description="The variables a sandbox of a shared gate (`egress serve --credentials FILE`) "
        "needs: placeholders derived with the gate's key from the state directory, git's "
        "credential helper and npm's per-registry tokens. Run it where the gate's state directory "
        "and sources are; give the output to the sandbox (an env file), never the values.",
    )
    env.add_argument("file", metavar="FILE")
    add_policy_option(env)
    add_state_dir_option(env)
    env.add_argument("--sandbox-id", default=None, help="the sandbox (default: anonymous clients)")
    env.set_defaults(func=_cmd_env)


def _cmd_check(args: argparse.Namespace) -> int:
    from proxy.app.exits import EXIT_OK, fail
    from proxy.credentials.loader import CredentialsError, load_credentials
    from proxy.credentials.sources import SourceError
    from proxy.policy.loader import load_policy_file
    from proxy.policy.model import PolicyError

    try:
        policy = load_policy_file(args.policy)
        declarations = load_credentials(args.file, policy)
    except (PolicyError, CredentialsError) as exc:
        return fail(*exc.lines())
    failed = 0
    for each in declarations:
        binding = each.binding
        sent = []
        delivery = binding.delivery
        if delivery.header:
            sent.append(
                f"header {delivery.header}"
                + (f" {list(delivery.formats)}" if delivery.formats else "")
            )
        if delivery.basic:
            sent.append(
                "basic" + (f" (user {delivery.basic_username})" if delivery.basic_username else "")
            )
        if delivery.query:
            sent.append(f"query {delivery.query}")
        line = f"{binding.name}: {binding.hosts_text()}; sent as {', '.join(sent)}"
        if binding.methods:
            line += f"; methods {', '.join(sorted(binding.methods))}"
        if binding.paths:
            line += f"; paths {', '.join(str(p) for p in binding.paths)}"
        line += f"; from {each.source.describe()}"
        if each.env:
            line += f"; sandbox variables {', '.join(each.env)}"
        if args.read:
            try:
                each.source.value()
                line += "; value readable"
            except SourceError as exc:
                failed += 1
                line += f"; NOT READABLE: {exc}"
        print(line)
    print(
        f"{args.file}: {len(declarations)} credential(s) load against {policy.files[0] if policy.files else 'the policy'}"
    )
    return 1 if failed else EXIT_OK


def _cmd_env(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.app import statedir
    from proxy.app.exits import EXIT_OK, fail
    from proxy.credentials.sandbox import provide
    from proxy.policy.loader import load_policy_file
    from proxy.policy.model import PolicyError

    try:
        policy = load_policy_file(args.policy)
        chosen = Path(args.state_dir) if args.state_dir else statedir.default_state_dir()
        state = statedir.prepare_state_dir(chosen)
        store = serve_store(args.file, policy, state, [args.sandbox_id] if args.sandbox_id else [])
    except PolicyError as exc:
        return fail(*exc.lines())
    except (ValueError, statedir.StateDirError) as exc:
        return fail(*str(exc).splitlines())
    provided = provide(store, args.sandbox_id, os.path.abspath(args.file))
    from dataclasses import replace

    no_npm = replace(provided, npm_tokens={})  # npm's lines go in a file, not the environment
    for name, value in no_npm.apply_to({}).items():
        print(f"{name}={value}")
    for prefix, value in provided.npm_tokens.items():
        print(f"# for the sandbox's .npmrc: {prefix}:_authToken={value}")
    return EXIT_OK


__all__ = [
    "add_credentials_option",
    "load_store",
    "register",
    "sandbox_credentials",
    "serve_store",
]
