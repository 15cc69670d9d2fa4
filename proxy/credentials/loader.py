"""Reading a credentials file: which secrets exist, where they may go, how they are sent.

The file is security configuration kept apart from the policy (and out of the sandbox's reach), so
the loader is as strict as the policy's: unknown keys, wrong types and duplicates are errors, every
problem is reported at once as ``file:line: credential 'NAME': key 'KEY': message``. A credential is
bound to exact host names (no wildcards: a secret goes to the hosts named for it) and each must be a
host the policy inspects on that port - otherwise the gate could never swap the placeholder there and
the binding would be a lie; the problem names the policy file as well.

The file holds no secret values, only where to read them (:mod:`proxy.credentials.sources`).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from proxy.core.credentials import Binding, Delivery
from proxy.core.hosts import InvalidHost, canonical_host, parse_endpoint
from proxy.core.paths import PathGlob, compile_glob
from proxy.credentials.sources import Source
from proxy.policy import yamlnodes
from proxy.policy.model import Policy
from proxy.policy.yamlnodes import MappingNode, Node, ScalarNode, SequenceNode

SCHEMA_VERSION = 1
TOP_KEYS = frozenset({"version", "credentials", "description"})
KEYS = frozenset(
    {
        "name",
        "description",
        "source",
        "hosts",
        "header",
        "format",
        "basic",
        "query",
        "methods",
        "paths",
        "env",
        "git",
        "npmrc",
    }
)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # names become metric labels
HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
QUERY_NAME = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
METHOD = re.compile(r"^[A-Za-z]{1,32}$")
USERNAME = re.compile(r"^[^:\x00-\x1f\x7f]{1,128}$")
# Headers the gate or the transport owns: a credential there would be dropped or misread.
RESERVED_HEADERS = frozenset(
    {"host", "proxy-authorization", "content-length", "transfer-encoding", "connection", "cookie"}
)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    credential: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}:{self.line}"]
        if self.credential is not None:
            parts.append(f"credential '{self.credential}'")
        if self.key is not None:
            parts.append(f"key '{self.key}'")
        parts.append(self.message)
        return ": ".join(parts)


class CredentialsError(Exception):
    """A credentials file that failed to load, with every problem found."""

    def __init__(self, problems: list[Problem], path: str) -> None:
        self.problems = problems
        self.path = path
        super().__init__("\n".join(str(p) for p in problems))

    def lines(self) -> list[str]:
        verdict = f"refusing to load {self.path}: {len(self.problems)} problem(s)"
        return [*(str(p) for p in self.problems), verdict]


@dataclass(frozen=True)
class Declaration:
    """One credential as declared: how the gate enforces it, where its value comes from, and what
    the sandbox gets (the variables set to its placeholder, git and npm configuration)."""

    binding: Binding
    source: Source
    env: tuple[str, ...] = ()
    git: bool = False
    npmrc: bool = False

    @property
    def name(self) -> str:
        return self.binding.name


def load_credentials(path: str | os.PathLike[str], policy: Policy | None) -> list[Declaration]:
    """Load and check a credentials file (against ``policy``'s inspected hosts when given); raises
    CredentialsError listing every problem."""
    shown = str(path)
    try:
        st = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        message = getattr(exc, "strerror", None) or str(exc)
        problem = Problem(shown, None, None, None, f"cannot read: {message}")
        raise CredentialsError([problem], shown) from None
    loader = _Loader(shown)
    if st.st_mode & 0o022:
        loader.problem(
            None,
            None,
            None,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): anyone who can "
            "edit it can send a credential to their own host; chmod go-w it",
        )
    declarations = loader.load(text, policy)
    if loader.problems:
        raise CredentialsError(loader.problems, shown)
    return declarations


class _Loader:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, node: Node | None, name: str | None, key: str | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(self.file, line, name, key, message))

    def load(self, text: str, policy: Policy | None) -> list[Declaration]:
        try:
            root = yamlnodes.compose(text)
        except yamlnodes.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            self.problems.append(Problem(self.file, line, None, None, f"not valid YAML: {exc}"))
            return []
        if not isinstance(root, MappingNode):
            self.problem(root, None, None, "expected a mapping with 'version' and 'credentials'")
            return []
        top = self._mapping(root, None, TOP_KEYS)
        version = top.get("version")
        if version is None or _scalar(version) != str(SCHEMA_VERSION):
            self.problem(version or root, None, "version", f"must be {SCHEMA_VERSION}")
        listed = top.get("credentials")
        if not isinstance(listed, SequenceNode):
            self.problem(listed or root, None, "credentials", "expected a list of credentials")
            return []
        out: list[Declaration] = []
        seen: dict[str, int] = {}
        placeholders_env: dict[str, str] = {}
        for node in listed.value:
            declaration = self._credential(node, policy)
            if declaration is None:
                continue
            name = declaration.name
            if name in seen:
                self.problem(node, name, "name", f"declared twice (first on line {seen[name]})")
                continue
            seen[name] = node.start_mark.line + 1
            for variable in declaration.env:
                if variable in placeholders_env:
                    self.problem(
                        node,
                        name,
                        "env",
                        f"{variable} is already set for credential '{placeholders_env[variable]}'",
                    )
                placeholders_env[variable] = name
            out.append(declaration)
        return out

    def _mapping(
        self, node: MappingNode, name: str | None, keys: frozenset[str]
    ) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key is None:
                self.problem(key_node, name, None, "keys must be strings")
                continue
            if key in out:
                self.problem(key_node, name, key, "given twice")
                continue
            if key not in keys:
                self.problem(
                    key_node, name, key, f"unknown key (expected one of {', '.join(sorted(keys))})"
                )
                continue
            out[key] = value_node
        return out

    def _credential(self, node: Node, policy: Policy | None) -> Declaration | None:
        if not isinstance(node, MappingNode):
            self.problem(node, None, None, "each credential is a mapping")
            return None
        name_node = next(
            (v for k, v in node.value if _scalar(k) == "name"), None
        )  # first, so that every later problem names the credential
        name = _scalar(name_node) if name_node is not None else None
        if name is None or not NAME.match(name):
            self.problem(
                name_node or node,
                None,
                "name",
                "a name of letters, digits, '.', '_' or '-' is required",
            )
            name = None
        count = len(self.problems)
        keys = self._mapping(node, name, KEYS)
        source = self._source(keys.get("source"), node, name)
        hosts = self._hosts(keys.get("hosts"), node, name, policy)
        delivery = self._delivery(keys, node, name)
        methods = self._methods(keys.get("methods"), name)
        paths = self._paths(keys.get("paths"), name)
        env = self._names(keys.get("env"), name, "env", ENV_NAME)
        git = self._bool(
            keys.get("git"), name, "git", default=delivery is not None and delivery.basic
        )
        npmrc = self._bool(keys.get("npmrc"), name, "npmrc", default=False)
        if delivery is not None:
            if git and not delivery.basic:
                self.problem(
                    keys["git"], name, "git", "git sends HTTP Basic credentials: add 'basic'"
                )
            if npmrc and (delivery.header != "authorization"):
                self.problem(
                    keys["npmrc"],
                    name,
                    "npmrc",
                    "npm sends 'Authorization: Bearer': add 'header: Authorization'",
                )
        if name is None or source is None or hosts is None or delivery is None:
            return None
        if len(self.problems) != count:
            return None
        binding = Binding(
            name, hosts, delivery, methods, paths, file=self.file, line=node.start_mark.line + 1
        )
        return Declaration(binding, source, env, git, npmrc)

    def _source(self, node: Node | None, parent: Node, name: str | None) -> Source | None:
        if not isinstance(node, MappingNode) or len(node.value) != 1:
            self.problem(
                node or parent,
                name,
                "source",
                "expected one of {env: VARIABLE}, {file: PATH}, {command: [ARGV...]}",
            )
            return None
        key_node, value = node.value[0]
        kind = _scalar(key_node)
        if kind == "env":
            variable = _scalar(value)
            if variable is None or not ENV_NAME.match(variable):
                self.problem(value, name, "source", "env: expects a variable name")
                return None
            return Source("env", env=variable)
        if kind == "file":
            path = _scalar(value)
            if not path or not os.path.isabs(path):
                self.problem(value, name, "source", "file: expects an absolute path")
                return None
            return Source("file", path=os.path.normpath(path))
        if kind == "command":
            argv = self._names(value, name, "source", None)
            if not argv:
                self.problem(value, name, "source", "command: expects a non-empty list (argv)")
                return None
            return Source("command", argv=argv)
        self.problem(key_node, name, "source", "expected env, file or command")
        return None

    def _hosts(
        self, node: Node | None, parent: Node, name: str | None, policy: Policy | None
    ) -> frozenset[tuple[str, int]] | None:
        entries = self._names(node, name, "hosts", None) if node is not None else ()
        if not entries:
            self.problem(node or parent, name, "hosts", "a list of host names (HOST or HOST:PORT)")
            return None
        out: set[tuple[str, int]] = set()
        for text, at in zip(entries, _items(node), strict=False):
            if "*" in text:
                self.problem(at, name, "hosts", f"{text!r}: credentials go to exact host names")
                continue
            try:
                host, port = parse_endpoint(text, default_port=443)
                canonical = canonical_host(host)
            except (ValueError, InvalidHost) as exc:
                self.problem(at, name, "hosts", f"{text!r}: {exc}")
                continue
            if not isinstance(canonical, str):
                self.problem(at, name, "hosts", f"{text!r}: credentials go to host names, not IPs")
                continue
            if policy is not None and policy.index.request_rules(canonical, port) is None:
                files = ", ".join(str(f) for f in policy.files) or "the policy"
                self.problem(
                    at,
                    name,
                    "hosts",
                    f"{canonical}:{port} is not inspected by {files}: the gate could not add the "
                    "credential there. Add 'inspect: true' (or request rules) to the policy rule "
                    f"for {canonical} on port {port}",
                )
                continue
            out.add((canonical, port))
        return frozenset(out) if out else None

    def _delivery(self, keys: dict[str, Node], parent: Node, name: str | None) -> Delivery | None:
        header_node = keys.get("header")
        header = _scalar(header_node) if header_node is not None else None
        if header_node is not None and (header is None or not HEADER.match(header)):
            self.problem(header_node, name, "header", "expected a header name")
            header = None
        if header is not None and header.lower() in RESERVED_HEADERS:
            self.problem(header_node, name, "header", f"{header} cannot carry a credential")
            header = None
        formats: tuple[str, ...] = ()
        if "format" in keys:
            formats = self._names(keys["format"], name, "format", None)
            if header is None:
                self.problem(keys["format"], name, "format", "only with 'header'")
            for each in formats:
                if each.count("{}") != 1:
                    self.problem(keys["format"], name, "format", f"{each!r}: needs one '{{}}'")
        basic = False
        username: str | None = None
        if "basic" in keys:
            node = keys["basic"]
            if isinstance(node, MappingNode):
                inner = self._mapping(node, name, frozenset({"username"}))
                username = _scalar(inner["username"]) if "username" in inner else None
                if username is None or not USERNAME.match(username):
                    self.problem(node, name, "basic", "expects {username: NAME}")
                basic = True
            else:
                basic = self._bool(node, name, "basic", default=False)
        if basic and header is not None and header.lower() != "authorization":
            self.problem(keys["basic"], name, "basic", "HTTP Basic travels in Authorization")
        query: str | None = None
        if "query" in keys:
            query = _scalar(keys["query"])
            if query is None or not QUERY_NAME.match(query):
                self.problem(keys["query"], name, "query", "expected a query parameter name")
                query = None
        if header is None and not basic and query is None:
            if "header" not in keys and "query" not in keys and "basic" not in keys:
                self.problem(parent, name, None, "say how it is sent: 'header', 'basic' or 'query'")
            return None
        return Delivery(
            header=header.lower() if header else None,
            formats=formats,
            basic=basic,
            basic_username=username,
            query=query,
        )

    def _methods(self, node: Node | None, name: str | None) -> frozenset[str] | None:
        if node is None:
            return None
        methods = self._names(node, name, "methods", METHOD)
        return frozenset(m.upper() for m in methods) if methods else None

    def _paths(self, node: Node | None, name: str | None) -> tuple[PathGlob, ...] | None:
        if node is None:
            return None
        out = []
        for text in self._names(node, name, "paths", None):
            try:
                out.append(compile_glob(text))
            except ValueError as exc:
                self.problem(node, name, "paths", str(exc))
        return tuple(out) if out else None

    def _names(
        self, node: Node | None, name: str | None, key: str, pattern: re.Pattern[str] | None
    ) -> tuple[str, ...]:
        if node is None:
            return ()
        items = _items(node)
        out = []
        for item in items:
            text = _scalar(item)
            if text is None or (pattern is not None and not pattern.match(text)):
                self.problem(item, name, key, f"unexpected entry {_describe(item)}")
                continue
            out.append(text)
        return tuple(out)

    def _bool(self, node: Node | None, name: str | None, key: str, *, default: bool) -> bool:
        if node is None:
            return default
        value = yamlnodes.boolean(node)  # (None too for "!!bool maybe")
        if value is not None:
            return value
        self.problem(node, name, key, "expected true or false")
        return default


def _items(node: Node | None) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    return [node] if node is not None else []


def _scalar(node: Node | None) -> str | None:
    if isinstance(node, ScalarNode) and node.tag in (
        "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:int",
    ):
        return str(node.value)
    return None


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "(a mapping)"
    if isinstance(node, SequenceNode):
        return "(a list)"
    return repr(str(node.value)[:40])


__all__ = ["CredentialsError", "Declaration", "Problem", "load_credentials"]
