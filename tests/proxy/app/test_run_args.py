"""`egress run`'s everyday command line read without argparse: the same reading as the parser's, or
none at all (then argparse reads it and reports what is wrong)."""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.app.run_args import APPEND, DEFAULTS, FLAG, OPTIONS, VALUE, read_run
from proxy.app.sandbox_cli import run_parser

ACTIONS = {
    argparse._StoreTrueAction: FLAG,  # type: ignore[attr-defined]
    argparse._StoreAction: VALUE,  # type: ignore[attr-defined]
    argparse._AppendAction: APPEND,  # type: ignore[attr-defined]
}


def run_actions() -> list[argparse.Action]:
    parser = run_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices["run"]._actions)


def parsed(words: list[str]) -> dict[str, Any] | None:
    """What argparse makes of the words (None for a usage error), without the command's function."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = run_parser().parse_args(words)
    except SystemExit:
        return None
    values = vars(args)
    del values["func"]
    return values


def test_the_defaults_are_the_parsers() -> None:
    values = parsed(["run", "--", "true"])
    assert values is not None
    assert {k: v for k, v in values.items() if k not in ("command", "cmd")} == DEFAULTS


def test_every_option_is_read_as_the_parser_reads_it() -> None:
    """A new `run` option must be added to OPTIONS: otherwise every command line would lack it."""
    seen = {}
    for action in run_actions():
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        (name,) = action.option_strings
        seen[name] = (action.dest, ACTIONS[type(action)], action.type, action.choices)
    assert {
        name: (o.dest, o.action, o.type, tuple(o.choices) if o.choices else None)
        for name, o in OPTIONS.items()
    } == {name: (d, a, t, tuple(c) if c else None) for name, (d, a, t, c) in seen.items()}


def test_an_everyday_hand_off_is_read_here() -> None:
    words = [
        "run",
        "--quiet",
        "--gate-socket",
        "/run/g.sock",
        "--sandbox-id",
        "sbx-1",
        "--",
        "true",
    ]
    assert read_run(words) == parsed(words)
    assert read_run(words) is not None


def test_what_is_not_read_here_is_left_to_argparse() -> None:
    for words in (
        ["run", "--gate-socket=/run/g.sock", "--", "true"],  # --opt=value
        ["run", "--gate-sock", "/run/g.sock", "--", "true"],  # an abbreviation
        ["run", "-h"],
        ["run", "--sandbox-id", "agent-7\n", "--", "true"],  # refused by its type: argparse says so
        ["run", "--summary", "xml", "--", "true"],  # not a choice
        ["run", "--proxy-port", "--", "true"],  # the value is missing
        ["run", "--quiet"],  # no command
        ["run", "--no-such-option", "--", "true"],
        ["serve"],
    ):
        assert read_run(words) is None, words


OPTION_WORDS = [*sorted(OPTIONS), "--", "-h", "--gate-sock", "--quiet=1", "-"]
VALUE_WORDS = [
    "x", "", "sbx-1", "3128", "0", "70000", "127.0.0.1:53", "[::1]:53", "text", "json", "grpc",
    "never", "task=T", "=x", "-x", "--", "a b", "1024", "agent-7\n", "/run/g.sock", "true",
]  # fmt: skip


@given(
    st.lists(st.sampled_from(OPTION_WORDS + VALUE_WORDS), max_size=8),
    st.lists(st.sampled_from(["true", "--quiet", "--", "-x", "sh"]), max_size=3),
)
def test_a_command_line_read_here_is_read_exactly_as_argparse_reads_it(
    words: list[str], tail: list[str]
) -> None:
    line = ["run", *words, *tail]
    ours = read_run(line)
    if ours is not None:
        assert ours == parsed(line), line


@st.composite
def option_lines(draw: st.DrawFn) -> list[str]:
    """Options of `run` with values (valid or not), then CMD: mostly the shape read here."""
    words = []
    for name in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=6)):
        words.append(name)
        if OPTIONS[name].action != FLAG:
            words.append(draw(st.sampled_from(VALUE_WORDS)))
    return ["run", *words, *draw(st.sampled_from([["--", "true"], ["sh", "-c", "x"], ["--"], []]))]


@given(option_lines())
def test_options_with_values_are_read_exactly_as_argparse_reads_them(line: list[str]) -> None:
    ours = read_run(line)
    if ours is not None:
        assert ours == parsed(line), line


VALID = {
    "--dns": "127.0.0.1:53",
    "--sandbox-id": "sbx-1",
    "--proxy-port": "8080",
    "--summary": "json",
    "--context": "task=T",
    "--otlp-protocol": "http",
    "--journal-fsync": "never",
    "--journal-max-bytes": "1024",
}


def test_each_option_with_a_good_value_is_read_here() -> None:
    for name, option in OPTIONS.items():
        line = [
            "run",
            name,
            *([] if option.action == FLAG else [VALID.get(name, "x")]),
            "--",
            "true",
        ]
        ours = read_run(line)
        assert ours is not None, line
        assert ours == parsed(line), line
        assert ours[option.dest] != DEFAULTS[option.dest], line
