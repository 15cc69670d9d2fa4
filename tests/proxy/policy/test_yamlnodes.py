"""libyaml composes what PyYAML's own parser composes (nodes, tags, values, lines) for every shipped
allowlist, and refuses what it refuses, as a YAML error with a line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.policy import yamlnodes
from proxy.policy.loader import PolicyError, load_policy

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted((ROOT / "allowlists").rglob("*.yaml"))


def _tree(node: Node | None) -> object:
    if node is None:
        return None
    where = (node.tag, node.start_mark.line, node.start_mark.column)
    if isinstance(node, ScalarNode):  # (style: libyaml says "" for plain where PyYAML says None)
        return (*where, node.value, node.style or None)
    if isinstance(node, SequenceNode):
        return (*where, [_tree(n) for n in node.value])
    assert isinstance(node, MappingNode)
    return (*where, [(_tree(k), _tree(v)) for k, v in node.value])


def _pure(text: str) -> Node | None:
    loader = yaml.SafeLoader(text)
    try:
        root: Node | None = loader.get_single_node()
        return root
    finally:
        loader.dispose()


def test_the_fast_parser_is_libyaml_here() -> None:
    """The development and CI machines have PyYAML with libyaml; elsewhere the pure parser is the
    fallback, and these tests compare it with itself."""
    assert yaml.__with_libyaml__
    assert yamlnodes.SafeLoader is yaml.CSafeLoader


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(ROOT).as_posix() for p in SHIPPED])
def test_every_shipped_allowlist_composes_to_the_same_nodes_and_lines(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert _tree(yamlnodes.compose(text)) == _tree(_pure(text))


@pytest.mark.parametrize(
    "text",
    ["a: \x07b\n", "a: b\x00\n", "a: \x1b[31m\n", "a: \ud800\n", "a: 1\n---\nb: 2\n", "a: [1, 2\n"],
    ids=["bell", "nul", "escape", "lone-surrogate", "two-documents", "unclosed-flow"],
)
def test_what_pyyaml_refuses_is_refused_as_a_yaml_error(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        _pure(text)
    with pytest.raises(yaml.YAMLError):
        yamlnodes.compose(text)


@pytest.mark.parametrize("value", ["true", "False", "yes", "0x1F", "0o17", "1_000", "-3", "+7"])
def test_scalars_read_as_the_safe_schema_reads_them(value: str) -> None:
    node = yamlnodes.compose(f"v: {value}\n")
    assert isinstance(node, MappingNode)
    scalar = node.value[0][1]
    assert yamlnodes.scalar(scalar) == yaml.safe_load(f"v: {value}\n")["v"]


_DEEP = "version: 1\nrules:\n  - host: " + "[" * 200_000 + "]" * 200_000 + "\n"


def test_deep_nesting_is_a_yaml_error_with_its_line_not_a_crash() -> None:
    """libyaml's composer recurses in C once per level: this many levels took the process down
    (SIGSEGV) and the pure one raises RecursionError. Run in a child so a crash fails the test."""
    code = (
        "import sys, yaml\n"
        "from proxy.policy import yamlnodes\n"
        "try:\n"
        "    yamlnodes.compose(sys.stdin.read())\n"
        "except yaml.MarkedYAMLError as exc:\n"
        "    print(exc.problem, exc.problem_mark.line + 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=_DEEP, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.split() == [*f"nested deeper than {yamlnodes.MAX_DEPTH} levels".split(), "3"]


@pytest.mark.parametrize("loader", [yaml.SafeLoader, yamlnodes.SafeLoader], ids=["pure", "fast"])
def test_nesting_up_to_the_limit_composes_with_either_parser(
    loader: type[yaml.SafeLoader], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlnodes, "SafeLoader", loader)
    depth = yamlnodes.MAX_DEPTH - 1  # inside the root mapping
    root = yamlnodes.compose("a: " + "[" * depth + "]" * depth + "\n")
    assert isinstance(root, MappingNode)
    with pytest.raises(yaml.MarkedYAMLError, match="nested deeper"):
        yamlnodes.compose("a: " + "[" * 2000 + "]" * 2000 + "\n")  # RecursionError in pure before


def test_a_deeply_nested_policy_is_refused_with_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("version: 1\nrules:\n  - host: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert problem.line == 3 and "nested deeper" in problem.message


@pytest.mark.parametrize("text", ["!!bool maybe", "!!bool ''", "!!bool 1", "!!bool [x]"])
def test_a_bool_tag_on_what_is_not_a_boolean_is_a_problem_with_its_line(
    tmp_path: Path, text: str
) -> None:
    """The safe constructor meets ``!!bool maybe`` with KeyError, which escaped the loader."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"version: 1\nrules:\n  - name: a\n    hosts: [a.example]\n    inspect: {text}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert problem.line == 5 and "expected true or false" in problem.message


@pytest.mark.parametrize("text", ["true", "True", "yes", "on", "false", "No", "OFF", "!!bool on"])
def test_booleans_read_as_the_safe_schema_reads_them(text: str) -> None:
    node = yamlnodes.compose(f"v: {text}\n")
    assert isinstance(node, MappingNode)
    value = node.value[0][1]
    expected = yaml.safe_load(f"v: {text}\n")["v"]
    assert yamlnodes.boolean(value) == (expected if isinstance(expected, bool) else None)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("rules:\n\ufeff  - name: x\n", 2),  # libyaml: a list of rules; PyYAML: a null and a key
        ("a: 1\r\n\ufeffb: 2\n", 2),
        ("a: 1\n\n\ufeff- b\n", 3),
        ("a: 1\u2028\ufeffb: 2\n", 2),
        ("a: [x,\n\ufeffy]\n", 2),
        ("\ufeff\ufeffa: 1\n", 1),
        ("a: 'x\ufeff'\n", 1),
    ],
)
def test_a_byte_order_mark_past_the_start_is_refused_with_its_line(text: str, line: int) -> None:
    """libyaml skips a BOM at the start of any line, PyYAML's parser reads it as text: the same file
    would be two different policies (or one and an error) with and without libyaml."""
    with pytest.raises(yaml.MarkedYAMLError, match="byte order mark") as caught:
        yamlnodes.compose(text)
    assert caught.value.problem_mark is not None
    assert caught.value.problem_mark.line + 1 == line


def test_a_byte_order_mark_opening_the_text_is_read_as_both_parsers_read_it() -> None:
    text = "\ufeffversion: 1\nrules: []\n"
    assert _tree(yamlnodes.compose(text)) == _tree(_pure(text))


_PIECES = ["a", "b: ", "- ", "? ", ": ", "\n", "  ", "    ", "[", "]", "{", "}", ", ", "#c", "'q'",
           '"d"', "&x ", "*x", "<<: ", "!!str ", "|\n", ">\n", "\t", "\r\n", "\x85", "\u2028",
           "\u2029", "\ufeff", "\xa0", "---\n", "...\n", "1", "true", "~", "\\"]  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24).map("".join))
def test_what_both_parsers_compose_they_compose_alike(text: str) -> None:
    """Where libyaml and PyYAML's own parser both accept a text, they read the same structure,
    values and lines (libyaml accepts some tabs PyYAML refuses, and refuses some texts it takes)."""
    results = []
    for compose in (yamlnodes.compose, _pure):
        try:
            results.append(_semantic(compose(text)))
        except yaml.YAMLError:
            results.append(None)
    if None not in results:
        assert results[0] == results[1]


def _semantic(node: Node | None) -> object:
    if node is None:
        return ()
    if isinstance(node, ScalarNode):  # (an empty value's mark differs: it is where nothing is)
        return (node.tag, None if node.value == "" else node.start_mark.line, node.value)
    if isinstance(node, SequenceNode):
        return (node.tag, node.start_mark.line, [_semantic(n) for n in node.value])
    assert isinstance(node, MappingNode)
    return (node.tag, node.start_mark.line, [(_semantic(k), _semantic(v)) for k, v in node.value])
