"""``egress run``'s command line in its everyday shape, read without argparse.

Every ``egress run`` reads its arguments before anything else, and argparse costs ~8 ms of it: the
module and gettext (with locale), and the ``run`` parser with its ~30 options, each checked through
a help formatter that imports shutil (with zlib, bz2 and lzma). A harness that wraps every tool call
in ``egress run`` pays that every time (docs/startup.md).

So a command line made only of the options in :data:`OPTIONS`, each spelled in full with its value as
the next word, then CMD (after ``--`` or as the first word that is not an option), is read here.
Anything else (``--opt=value``, an abbreviation, ``-h``, a value that starts with ``-``, a value its
option's type or choices refuse, CMD missing, an option not listed) is left to argparse
(:func:`proxy.app.sandbox_cli.run_parser`), which stays the one definition of the command line and
writes every usage error. ``tests/proxy/app/test_run_args.py`` holds :data:`DEFAULTS` and
:data:`OPTIONS` to that parser and compares both readings of generated command lines.

The argument types of ``run`` live here too, so that this reading and argparse convert a value with
the same function; they import argparse only to report a bad value.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any


def sandbox_id(text: str) -> str:
    from proxy.core.sandbox_id import check_sandbox_id

    try:
        return check_sandbox_id(text)
    except ValueError as exc:
        raise _type_error(str(exc)) from None


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _type_error(f"{text!r}: expected a port 1-65535")
    return int(text)


def host_port(text: str) -> tuple[str, int]:
    from proxy.core.hosts import parse_endpoint

    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise _type_error(f"{text!r}: {exc}") from None


def context_pair(text: str) -> tuple[str, str]:
    from proxy.attribution.context import parse_pair

    try:
        return parse_pair(text)
    except ValueError as exc:
        raise _type_error(str(exc)) from None


def _type_error(message: str) -> Exception:
    import argparse  # a bad value: argparse reports it (see read_run)

    return argparse.ArgumentTypeError(message)


# Every destination of the `run` parser, as argparse sets it when no option is given (a list default
# is copied for each reading).
DEFAULTS: dict[str, Any] = {
    "policy": None,
    "managed_policy": None,
    "proxy": None,
    "dns": None,
    "gate_socket": None,
    "reuse_gate": False,
    "sandbox_id": None,
    "credentials": None,
    "quiet": False,
    "summary": "text",
    "context": [],
    "json": False,
    "no_isolation": False,
    "proxy_port": 3128,
    "decision_log": None,
    "nameserver": None,
    "hosts_file": "/etc/hosts",
    "state_dir": None,
    "ca_cert": None,
    "ca_key": None,
    "upstream_ca": None,
    "record_query_values": False,
    "otlp_endpoint": None,
    "otlp_protocol": None,
    "journal": None,
    "journal_fsync": "interval",
    "journal_max_bytes": 67108864,
    "audit_required": False,
    "metrics": None,
    "no_metrics": False,
}

FLAG, VALUE, APPEND = "store_true", "store", "append"


class Option:
    """How one option of ``run`` is read: its destination, argparse's action, the value's type and
    the values allowed."""

    __slots__ = ("action", "choices", "dest", "type")

    def __init__(
        self,
        dest: str,
        action: str = VALUE,
        type: Callable[[str], Any] | None = None,  # argparse's name for it
        choices: Sequence[str] | None = None,
    ) -> None:
        self.dest = dest
        self.action = action
        self.type = type
        self.choices = choices


OPTIONS: dict[str, Option] = {
    "--policy": Option("policy"),
    "--managed-policy": Option("managed_policy"),
    "--proxy": Option("proxy"),
    "--dns": Option("dns", type=host_port),
    "--gate-socket": Option("gate_socket"),
    "--reuse-gate": Option("reuse_gate", FLAG),
    "--sandbox-id": Option("sandbox_id", type=sandbox_id),
    "--credentials": Option("credentials"),
    "--quiet": Option("quiet", FLAG),
    "--summary": Option("summary", choices=("text", "json")),
    "--context": Option("context", APPEND, type=context_pair),
    "--json": Option("json", FLAG),
    "--no-isolation": Option("no_isolation", FLAG),
    "--proxy-port": Option("proxy_port", type=port_number),
    "--decision-log": Option("decision_log"),
    "--nameserver": Option("nameserver", APPEND),
    "--hosts-file": Option("hosts_file"),
    "--state-dir": Option("state_dir"),
    "--ca-cert": Option("ca_cert"),
    "--ca-key": Option("ca_key"),
    "--upstream-ca": Option("upstream_ca"),
    "--record-query-values": Option("record_query_values", FLAG),
    "--otlp-endpoint": Option("otlp_endpoint"),
    "--otlp-protocol": Option("otlp_protocol", choices=("grpc", "http")),
    "--journal": Option("journal"),
    "--journal-fsync": Option("journal_fsync", choices=("always", "interval", "never")),
    "--journal-max-bytes": Option("journal_max_bytes", type=int),
    "--audit-required": Option("audit_required", FLAG),
    "--metrics": Option("metrics"),
    "--no-metrics": Option("no_metrics", FLAG),
}


def read_run(words: Sequence[str]) -> dict[str, Any] | None:
    """What ``egress run``'s parser makes of ``words`` (``["run", ...]``), without its ``func``;
    None when the words are not in the shape read here (argparse then reads them)."""
    if not words or words[0] != "run":
        return None
    values: dict[str, Any] = {
        dest: list(default) if isinstance(default, list) else default
        for dest, default in DEFAULTS.items()
    }
    i = 1
    while i < len(words):
        word = words[i]
        if word == "--" or not word.startswith("-"):
            break  # CMD: argparse's REMAINDER takes this word and every one after it
        option = OPTIONS.get(word)
        if option is None:
            return None
        if option.action == FLAG:
            values[option.dest] = True
            i += 1
            continue
        if i + 1 >= len(words) or words[i + 1].startswith("-"):
            return None
        try:
            value = option.type(words[i + 1]) if option.type is not None else words[i + 1]
        except Exception:  # what argparse reports (ArgumentTypeError, TypeError, ValueError)
            return None
        if option.choices is not None and value not in option.choices:
            return None
        if option.action == APPEND:
            values[option.dest] = [*(values[option.dest] or ()), value]
        else:
            values[option.dest] = value
        i += 2
    if i >= len(words):
        return None  # no CMD: argparse says what is missing
    return {"command": "run", **values, "cmd": list(words[i:])}
