"""What a sandbox gets instead of the real credentials: placeholders where its tools look.

- each declared ``env`` variable (``GH_TOKEN``, ``GITHUB_TOKEN``, ``NPM_TOKEN``, ...) holds the
  credential's placeholder;
- ``git: true``: a credential helper for each bound host, given through ``GIT_CONFIG_*`` (command
  scope, read last, no file written): it resets any helper configured before it for that URL and
  answers ``username`` and the placeholder, so ``git clone https://HOST/...`` authenticates;
- ``npmrc: true``: a private copy of the user's npm configuration with ``//HOST/:_authToken=
  PLACEHOLDER`` for each bound host, named by ``NPM_CONFIG_USERCONFIG`` (npm's own per-registry
  variables, ``npm_config_//HOST/:_authToken``, are not valid shell names: every shell drops them
  before npm would see them), so npm sends ``Authorization: Bearer PLACEHOLDER``;
- removed: the variables the gate reads values from, and any other variable whose value contains a
  real value (a ``GITHUB_TOKEN`` inherited from the user's shell): the sandbox never holds one;
- hidden (an empty read-only mount over each): the credentials file and every ``file:`` source.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.credentials.store import CredentialStore


@dataclass(frozen=True)
class Provided:
    """The sandbox's side of the credentials: what ``egress run`` sets, removes and hides."""

    store: CredentialStore
    placeholders: Mapping[str, str]  # credential name -> this sandbox's placeholder
    env: Mapping[str, str]
    unset: tuple[str, ...]
    hidden: tuple[str, ...]
    npm_tokens: Mapping[str, str] = field(default_factory=dict)  # "//host[:port]/" -> placeholder
    _directory: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        """Remove the files written for the sandbox (its npm configuration)."""
        for directory in self._directory:
            shutil.rmtree(directory, ignore_errors=True)
        self._directory.clear()

    def apply_to(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` without any real value or source variable, with the placeholders set."""
        secrets = self.store.secret_forms()  # the values, and encoded (a Basic header's base64)
        out = {}
        for name, value in env.items():
            if name in self.unset:
                continue
            if name not in self.env and any(secret in value for secret in secrets):
                sys.stderr.write(
                    f"egress run: {name} held a credential's real value (or an encoding of it); "
                    "it is not passed to the sandbox\n"
                )
                continue
            out[name] = value
        for name, value in _git_config(out, self).items():
            out[name] = value
        if self.npm_tokens:
            out["NPM_CONFIG_USERCONFIG"] = self._npmrc(out)
            out.pop("npm_config_userconfig", None)
        out.update(self.env)
        return out

    def _npmrc(self, env: Mapping[str, str]) -> str:
        """The user's npm configuration plus this sandbox's registry tokens, in a private file."""
        given = env.get("NPM_CONFIG_USERCONFIG") or env.get("npm_config_userconfig")
        source = given or os.path.join(env.get("HOME", os.path.expanduser("~")), ".npmrc")
        try:
            with open(source, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        keys = {f"{prefix}:_authtoken" for prefix in self.npm_tokens}
        kept = [line for line in lines if line.split("=", 1)[0].strip().lower() not in keys]
        kept += [f"{prefix}:_authToken={value}" for prefix, value in self.npm_tokens.items()]
        directory = tempfile.mkdtemp(prefix="egress-credentials-")
        self._directory.append(directory)
        path = os.path.join(directory, "npmrc")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write("\n".join(kept) + "\n")
        return path


def provide(store: CredentialStore, sandbox_id: str | None, credentials_file: str) -> Provided:
    """Issue this sandbox's placeholders and say what its environment and mounts must be."""
    placeholders = store.issue(sandbox_id)
    env: dict[str, str] = {}
    unset: list[str] = []
    npm: dict[str, str] = {}
    hidden = [credentials_file, os.path.realpath(credentials_file)]
    for name, declaration in store.declarations.items():
        placeholder = placeholders[name]
        for variable in declaration.env:
            env[variable] = placeholder
        source = declaration.source
        if source.kind == "env" and source.env is not None and source.env not in declaration.env:
            unset.append(source.env)
        if source.kind == "file" and source.path is not None:
            hidden += [source.path, os.path.realpath(source.path)]  # a symlink and its target
        if declaration.npmrc:
            for host, port in sorted(declaration.binding.hosts):
                npm[f"//{_authority(host, port)}/"] = placeholder
    hidden_paths = tuple(dict.fromkeys(hidden))
    return Provided(store, placeholders, env, tuple(unset), hidden_paths, npm)


def _git_config(env: Mapping[str, str], provided: Provided) -> dict[str, str]:
    entries: list[tuple[str, str]] = []
    for name, declaration in provided.store.declarations.items():
        if not declaration.git:
            continue
        username = declaration.binding.delivery.basic_username or "x-access-token"
        helper = (
            '!f() { test "$1" = get || exit 0; '
            f"echo username={shlex.quote(username)}; "
            f"echo password={provided.placeholders[name]}; }}; f"
        )
        for host, port in sorted(declaration.binding.hosts):
            url = f"https://{_authority(host, port)}"
            # An empty helper first resets whatever helpers earlier configuration set for it.
            entries += [(f"credential.{url}.helper", ""), (f"credential.{url}.helper", helper)]
    if not entries:
        return {}
    try:
        start = int(env.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        start = 0
    out = {"GIT_CONFIG_COUNT": str(start + len(entries))}
    for offset, (key, value) in enumerate(entries):
        out[f"GIT_CONFIG_KEY_{start + offset}"] = key
        out[f"GIT_CONFIG_VALUE_{start + offset}"] = value
    return out


def _authority(host: str, port: int) -> str:
    return host if port == 443 else f"{host}:{port}"


__all__ = ["Provided", "provide"]
