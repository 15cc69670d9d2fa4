"""YAML text to nodes (each with its line) and scalar nodes to values: for the policy, managed and
credential files, which report every problem with its file and line.

The parser is libyaml's (PyYAML's ``CSafeLoader``) when PyYAML was built with it, else PyYAML's own
(``SafeLoader``): the same YAML 1.1 grammar, node classes, tags and line marks. libyaml composes a
policy about 20 times faster; a 10,000-rule policy's reload spent most of its load in the pure-Python
parser. Text that is not valid Unicode (a lone surrogate), which PyYAML's reader refuses as a YAML error,
is refused the same way here before libyaml sees it.
"""

from __future__ import annotations

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import Node

SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def compose(text: str) -> Node | None:
    """The single document's root node (None for an empty text); yaml.YAMLError for bad YAML,
    including control characters and text that is not valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise yaml.YAMLError(f"the text is not valid Unicode: {exc.reason}") from None
    loader = SafeLoader(text)
    try:
        root: Node | None = loader.get_single_node()
        return root
    finally:
        loader.dispose()


def scalar(node: Node) -> object:
    """A scalar node's value as YAML's safe schema reads it (``true`` -> True, ``0x1F`` -> 31)."""
    return SafeConstructor().construct_object(node)
