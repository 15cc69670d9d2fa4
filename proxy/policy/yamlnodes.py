"""YAML text to nodes (each with its line) and scalar nodes to values: for the policy, managed and
credential files, which report every problem with its file and line.

The parser is libyaml's (PyYAML's ``CSafeLoader``) when PyYAML was built with it, else PyYAML's own
(``SafeLoader``): the same YAML 1.1 grammar, node classes, tags and line marks. libyaml composes a
policy about 20 times faster; a 10,000-rule policy's reload spent most of its load in the pure-Python
parser. Text that is not valid Unicode (a lone surrogate), which PyYAML's reader refuses as a YAML error,
is refused the same way here before libyaml sees it.

Nesting is bounded (:data:`MAX_DEPTH`) before anything is composed: both composers recurse once per
level, libyaml's in C without Python's recursion limit, so some tens of thousands of ``[`` crash the
process (SIGSEGV) and the pure one raises RecursionError, neither a YAML error with a line. The depth
is read from libyaml's event stream, which is iterative; a policy nests a handful of levels.

A byte order mark (U+FEFF, invisible in an editor) anywhere but at the very start is refused too:
libyaml skips one that starts a line (or follows the opening one) as if it were not written, while
PyYAML's own parser reads it as part of the text, so the same file would compose to different structures on machines with and without
libyaml (``rules:\n<U+FEFF>  - name: x`` is a list of rules to one, a null and a key to the other).
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.policy import yamlimport  # noqa: F401 - PyYAML first, as that module imports it

# isort: split
import yaml
from yaml import MarkedYAMLError, YAMLError, safe_dump
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MappingNode",
    "MarkedYAMLError",
    "Node",
    "SafeLoader",
    "ScalarNode",
    "SequenceNode",
    "YAMLError",
    "boolean",
    "compose",
    "safe_dump",
    "safe_load",
    "scalar",
]

SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # nested mappings and lists; a policy uses fewer than ten

_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def compose(text: str) -> Node | None:
    """The single document's root node (None for an empty text); yaml.YAMLError for bad YAML,
    including control characters and text that is not valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise yaml.YAMLError(f"the text is not valid Unicode: {exc.reason}") from None
    stray = text.find("\ufeff", 1)
    if stray > 0:
        line = sum(text.count(c, 0, stray) for c in "\n\x85\u2028\u2029")
        line += text.count("\r", 0, stray) - text.count("\r\n", 0, stray)
        mark = yaml.error.Mark("<unicode string>", stray, line, 0, None, 0)
        raise yaml.scanner.ScannerError(
            None, None, "a byte order mark (U+FEFF) past the start", mark
        )
    _check_events(text)
    loader = SafeLoader(text)
    try:
        root: Node | None = loader.get_single_node()
        return root
    finally:
        loader.dispose()


def _check_events(text: str) -> None:
    """ComposerError (a YAML error with its line) where the nesting passes :data:`MAX_DEPTH` or an
    alias is used; the parser's own errors are raised as they are."""
    loader = SafeLoader(text)
    next_event: Callable[[], yaml.Event | None] = loader.get_event
    depth = 0
    try:
        while (event := next_event()) is not None:
            if isinstance(event, _OPEN):
                depth += 1
                if depth > MAX_DEPTH:
                    problem = f"nested deeper than {MAX_DEPTH} levels"
                    raise yaml.composer.ComposerError(None, None, problem, _mark(event.start_mark))
            elif isinstance(event, _CLOSE):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                # Every use of an alias is the whole node again: a 50 KB file of one 2,000-host
                # list used by 500 rules read as a million hosts (and ~1 MB as gigabytes), and a
                # rule's value stands far from it. These files never need one.
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "aliases (*name) are not accepted: write the value out",
                    _mark(event.start_mark),
                )
    finally:
        loader.dispose()


def _mark(at: Any) -> yaml.error.Mark | None:
    """libyaml's own Mark class, copied into PyYAML's (which the errors' users read)."""
    if at is None:
        return None
    return yaml.error.Mark(at.name, at.index, at.line, at.column, None, 0)


def safe_load(text: str) -> object:
    """``yaml.safe_load`` with :func:`compose`'s checks (nesting, aliases, byte order marks,
    Unicode): for the small configuration files that are read whole (identities, admin tokens)."""
    root = compose(text)
    return None if root is None else SafeConstructor().construct_document(root)


def boolean(node: Node) -> bool | None:
    """A ``!!bool`` scalar's value; None for any other node, and for a tag written by hand on a
    value that is not a boolean (``!!bool maybe``, which the safe constructor meets with KeyError)."""
    if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
        return None
    value = SafeConstructor.bool_values.get(str(node.value).lower())
    return value if isinstance(value, bool) else None


def scalar(node: Node) -> object:
    """A scalar node's value as YAML's safe schema reads it (``true`` -> True, ``0x1F`` -> 31)."""
    return SafeConstructor().construct_object(node)
