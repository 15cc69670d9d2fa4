"""Reading policy files: strict schema v1, includes, and every problem reported at once.

A policy is security configuration, so anything the loader does not understand is an error rather than
something to skip: unknown keys, wrong types, duplicate mapping keys (YAML would silently keep the last),
duplicate rule names, networks with host bits set, ports outside 1-65535, wildcards as wide as a public
suffix. Files are parsed with ``yaml.compose`` so each problem can name its file, line, rule and key.

Includes are loaded depth-first after the including file's own rules; a file reached twice is loaded
once, a cycle is an error that names the chain. The policy version is a hash of the loaded files' bytes
in load order, so the same files give the same version on every machine and in every directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv6Network, ip_network
from pathlib import Path

from proxy.core.paths import PathGlob, compile_glob
from proxy.policy import yamlnodes
from proxy.policy.executables import Executable, check_executable
from proxy.policy.model import (
    DEFAULT_ASK_TIMEOUT,
    DEFAULT_PORTS,
    GRAPHQL_OPERATIONS,
    MAX_ASK_TIMEOUT,
    Action,
    HostPattern,
    IPNetwork,
    Mode,
    Policy,
    PolicyError,
    Problem,
    RequestConditions,
    Review,
    Rule,
    parse_host_pattern,
)
from proxy.policy.presets import is_preset_name, preset_path, presets_dir
from proxy.policy.yamlnodes import MappingNode, Node, ScalarNode, SequenceNode

SCHEMA_VERSION = 1
TOP_KEYS = frozenset({"version", "mode", "include", "rules", "allow_internal", "description"})
REQUEST_KEYS = frozenset(
    {
        "methods",
        "paths",
        "paths_case",
        "query",
        "websocket",
        "max_request_bytes",
        "graphql_operations",
        "json_body",
    }
)
ASK_KEYS = frozenset({"timeout", "review"})  # meaningful on ask rules only
RULE_KEYS = (
    frozenset({"name", "action", "hosts", "cidrs", "ports", "description", "comment", "inspect"})
    | {"mode", "executables"}
    | REQUEST_KEYS
    | ASK_KEYS
)
# An HTTP method or override: an RFC 9110 token.
METHOD = re.compile(r"^[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,31}$")
QUERY_NAME = re.compile(r"^[A-Za-z0-9._~!$'()*+,:@/-]{1,128}$")
# Rule names end up in response headers, log lines and metric labels: keep them boring.
RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_TYPE_NAMES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "nothing (null)",
    "tag:yaml.org,2002:timestamp": "a date",
}
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def load_policy(path: str | os.PathLike[str], *, managed: bool = False) -> Policy:
    """Load a policy and everything it includes; raises PolicyError listing every problem found.

    ``managed``: the file is a managed policy, whose top level may hold a ``managed:`` section
    (read by :mod:`proxy.policy.managed`; the loader only lets it through)."""
    loader = _Loader()
    loader.managed = managed
    loader.load_top(Path(path))
    if loader.problems:
        raise PolicyError(loader.problems, str(path))
    return loader.policy()


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """A policy file's bytes. Only a regular file is read: a FIFO or a device named as a policy (or
    an include) would leave the reader waiting for ever, and a gate with it (OSError instead)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read()
    finally:
        os.close(fd)


def policy_file(path: str | os.PathLike[str] | None) -> Path:
    """The file a command runs with: the one it was given, or the shipped default preset."""
    return Path(path) if path else preset_path("default")


def load_policy_file(path: str | os.PathLike[str] | None) -> Policy:
    """:func:`load_policy` for a command: the default preset when no file is given, and every
    failure, an unreadable path included, as a PolicyError whose ``lines()`` say why."""
    target = policy_file(path)
    try:
        return load_policy(target)
    except OSError as exc:
        problem = Problem(str(target), None, None, None, f"cannot read: {exc.strerror or exc}")
        raise PolicyError([problem], str(target)) from None


def lint_files(paths: Iterable[str | os.PathLike[str]]) -> list[Problem]:
    """Every problem in every file (and its includes), each reported once; empty means all load."""
    problems: list[Problem] = []
    seen: set[Problem] = set()
    for path in paths:
        loader = _Loader()
        loader.load_top(Path(path))
        for problem in loader.problems:
            if problem not in seen:
                seen.add(problem)
                problems.append(problem)
    return problems


def display_path(path: Path) -> str:
    """Paths in messages: relative to the working directory when below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a value sits, so a problem can be reported against it."""

    file: str
    rule: str | None = None
    key: str | None = None

    def at(self, key: str) -> _Where:
        return _Where(self.file, self.rule, key)


_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)")  # how a number is written in a policy


class _Loader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.sources: list[tuple[Path, bytes]] = []
        self.named: list[Path] = []  # each file as named, before symlinks are resolved
        self.loaded: set[Path] = set()
        self.rules: list[Rule] = []
        self.rule_sites: dict[str, str] = {}
        self.allow_internal: list[IPNetwork] = []
        self.mode: Mode = Mode.ENFORCE
        self.managed = False  # the top file may carry a managed: section

    # -- results --------------------------------------------------------------------------------

    def policy(self) -> Policy:
        digest = hashlib.sha256()
        for _, data in self.sources:
            digest.update(b"%d\n" % len(data))
            digest.update(data)
        return Policy(
            version=digest.hexdigest()[:16],
            mode=self.mode,
            rules=tuple(self.rules),
            allow_internal=tuple(dict.fromkeys(self.allow_internal)),
            files=tuple(path for path, _ in self.sources),
            named=tuple(dict.fromkeys(self.named)),
        )

    def problem(self, where: _Where, node: Node | None, message: str) -> None:
        line = None if node is None else node.start_mark.line + 1
        self.problems.append(Problem(where.file, line, where.rule, where.key, message))

    # -- files ----------------------------------------------------------------------------------

    def load_top(self, path: Path) -> None:
        self.load(path, (), None, None, top=True)

    def load(
        self,
        path: Path,
        stack: tuple[Path, ...],
        origin: _Where | None,
        origin_node: Node | None,
        *,
        top: bool,
    ) -> None:
        self.named.append(path)
        resolved = path.resolve()
        if resolved in stack:
            chain = " -> ".join(display_path(p) for p in (*stack, resolved))
            self.problem(
                origin or _Where(display_path(resolved)), origin_node, f"include cycle: {chain}"
            )
            return
        if resolved in self.loaded:
            return  # reached twice by different routes: its rules are already in
        self.loaded.add(resolved)
        shown = display_path(resolved)
        try:
            data = read_regular(resolved)
        except OSError as exc:
            where = origin or _Where(shown)
            self.problem(where, origin_node, f"cannot read {shown}: {exc.strerror or exc}")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(_Where(shown), None, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        root = self.compose(text, shown)
        if root is None:
            return
        self.sources.append((resolved, data))
        self.file(root, resolved, shown, (*stack, resolved), top=top)

    def compose(self, text: str, shown: str) -> Node | None:
        try:
            # Inside the try: the reader rejects control characters while it is being constructed.
            root = yamlnodes.compose(text)
        except yamlnodes.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = None if mark is None else mark.line + 1
            message = " ".join(str(p) for p in (exc.context, exc.problem) if p)
            self.problems.append(Problem(shown, line, None, None, f"invalid YAML: {message}"))
            return None
        except yamlnodes.YAMLError as exc:
            self.problems.append(Problem(shown, None, None, None, f"invalid YAML: {exc}"))
            return None
        if root is None:
            self.problems.append(
                Problem(shown, None, None, None, "empty file; a policy starts with 'version: 1'")
            )
        return root

    def file(
        self, root: Node, path: Path, shown: str, stack: tuple[Path, ...], *, top: bool
    ) -> None:
        here = _Where(shown)
        keys = TOP_KEYS | {"managed"} if top and self.managed else TOP_KEYS
        fields = self.mapping(here, root, keys, "a policy file")
        if fields is None:
            return
        version = fields.get("version")
        if version is None:
            self.problem(here.at("version"), root, "missing; a policy starts with 'version: 1'")
        else:
            value = self.integer(here.at("version"), version)
            if value is not None and value != SCHEMA_VERSION:
                self.problem(
                    here.at("version"),
                    version,
                    f"{value} is not supported (this gate reads version 1)",
                )
        if "mode" in fields:
            self.read_mode(here.at("mode"), fields["mode"], top=top)
        if "description" in fields:
            self.string(here.at("description"), fields["description"])
        if "allow_internal" in fields:
            for item in self.sequence(here.at("allow_internal"), fields["allow_internal"]):
                net = self.network(here.at("allow_internal"), item)
                if net is not None:
                    self.allow_internal.append(net)
        if "rules" in fields:
            for i, item in enumerate(self.sequence(here.at("rules"), fields["rules"]), 1):
                rule = self.rule(here, item, i)
                if rule is not None:
                    self.rules.append(rule)
        if "include" in fields:
            for item in self.sequence(here.at("include"), fields["include"]):
                name = self.string(here.at("include"), item)
                if name is not None:
                    self.include(here.at("include"), item, name, path, stack)

    def read_mode(self, where: _Where, node: Node, *, top: bool) -> None:
        text = self.string(where, node)
        if text is None:
            return
        try:
            mode = Mode(text)
        except ValueError:
            self.problem(where, node, f"{text!r} is not a mode (enforce or report)")
            return
        if top:
            self.mode = mode
        elif mode is not self.mode:
            self.problem(
                where,
                node,
                f"an included file cannot change the mode to {mode}; "
                f"set 'mode' in the top-level policy file",
            )

    def include(
        self, where: _Where, node: Node, name: str, path: Path, stack: tuple[Path, ...]
    ) -> None:
        if is_preset_name(name):
            target = preset_path(name)
            if not target.is_file():
                self.problem(
                    where, node, f"unknown preset {name!r} (no {target.name} in {presets_dir()})"
                )
                return
        else:
            target = path.parent / name
        self.load(target, stack, where, node, top=False)

    # -- rules ----------------------------------------------------------------------------------

    def rule(self, here: _Where, node: Node, number: int) -> Rule | None:
        before = len(self.problems)
        label = _Where(here.file, f"#{number}")
        name_node = _get(node, "name") if isinstance(node, MappingNode) else None
        name: str | None = None
        if name_node is not None:
            name = self.string(label.at("name"), name_node)
            if name is not None and not RULE_NAME.fullmatch(name):
                self.problem(
                    label.at("name"),
                    name_node,
                    f"{name!r} is not a rule name (letters, digits, '.', '_', '-'; at most 64)",
                )
                name = None
        where = label if name is None else _Where(here.file, name)
        fields = self.mapping(where, node, RULE_KEYS, "a rule")
        if fields is None:
            return None
        if name_node is None:
            self.problem(where.at("name"), node, "missing; every rule needs a unique name")
        elif name is not None:
            site = f"{here.file}:{name_node.start_mark.line + 1}"
            if name in self.rule_sites:
                self.problem(
                    where.at("name"),
                    name_node,
                    f"duplicate rule name (first defined at {self.rule_sites[name]})",
                )
            else:
                self.rule_sites[name] = site

        action = Action.ALLOW
        if "action" in fields:
            text = self.string(where.at("action"), fields["action"])
            if text is not None:
                try:
                    action = Action(text)
                except ValueError:
                    self.problem(
                        where.at("action"),
                        fields["action"],
                        f"{text!r} is not allow, deny or ask",
                    )
        timeout, review = self.ask_settings(where, fields, action)

        hosts: list[HostPattern] = []
        for item in self.sequence(where.at("hosts"), fields.get("hosts")):
            text = self.string(where.at("hosts"), item)
            if text is None:
                continue
            try:
                hosts.append(parse_host_pattern(text))
            except ValueError as exc:
                self.problem(where.at("hosts"), item, str(exc))

        cidrs: list[IPNetwork] = []
        for item in self.sequence(where.at("cidrs"), fields.get("cidrs")):
            net = self.network(where.at("cidrs"), item)
            if net is not None:
                cidrs.append(net)

        ports: frozenset[int] | None = DEFAULT_PORTS if action is not Action.DENY else None
        if "ports" in fields:
            items = self.sequence(where.at("ports"), fields["ports"])
            if not items and isinstance(fields["ports"], SequenceNode):
                self.problem(
                    where.at("ports"),
                    fields["ports"],
                    "empty list matches nothing; list ports or leave the key out",
                )
            values: list[int] = []
            for item in items:
                port = self.integer(where.at("ports"), item)
                if port is None:
                    continue
                if not 1 <= port <= 65535:
                    self.problem(where.at("ports"), item, f"{port} is not a port (1-65535)")
                    continue
                values.append(port)
            ports = frozenset(values)

        description = None
        for key in ("description", "comment"):
            if key in fields:
                text = self.string(where.at(key), fields[key])
                description = description or text

        if not hosts and not cidrs and "hosts" not in fields and "cidrs" not in fields:
            self.problem(where, node, "a rule needs 'hosts' or 'cidrs'")
        elif not hosts and not cidrs and len(self.problems) == before:
            self.problem(where, node, "a rule needs at least one entry in 'hosts' or 'cidrs'")
        request = self.request_conditions(where, node, fields, action)
        inspect = False
        if "inspect" in fields:
            inspect = bool(self.boolean(where.at("inspect"), fields["inspect"]))
            if inspect and action is Action.DENY and request is None:
                self.problem(
                    where.at("inspect"),
                    fields["inspect"],
                    "a deny rule without request conditions refuses the whole host; "
                    "there are no requests to inspect",
                )
        if (request is not None or inspect) and "cidrs" in fields:
            self.problem(
                where,
                node,
                "request conditions and 'inspect' apply to host names; an IP destination has no "
                "name to issue a certificate for (use 'hosts')",
            )
        if (request is not None or inspect) and "ports" in fields and ports and 22 in ports:
            self.problem(
                where.at("ports"),
                fields.get("ports", node),
                "port 22 carries SSH, whose requests the gate cannot read; put SSH in its own "
                "rule without request conditions",
            )
        rule_mode = self.rule_mode(where.at("mode"), fields.get("mode"), action)
        executables = self.executables(where, fields, action)
        if len(self.problems) != before or name is None:
            return None
        return Rule(
            name=name,
            action=action,
            hosts=tuple(dict.fromkeys(hosts)),
            cidrs=tuple(dict.fromkeys(cidrs)),
            ports=ports,
            file=here.file,
            line=node.start_mark.line + 1,
            description=description,
            request=request,
            inspect=inspect,
            timeout=timeout,
            review=review,
            mode=rule_mode,
            executables=executables,
        )

    def rule_mode(self, where: _Where, node: Node | None, action: Action) -> Mode | None:
        """A rule's own ``mode`` (None: the policy's). An ask rule is always a question to a person:
        reporting it would let the request through unasked."""
        if node is None:
            return None
        text = self.string(where, node)
        if text is None:
            return None
        try:
            mode = Mode(text)
        except ValueError:
            self.problem(where, node, f"{text!r} is not a mode (enforce or report)")
            return None
        if action is Action.ASK:
            self.problem(where, node, "an ask rule asks in every mode; drop 'mode' here")
            return None
        return mode

    def executables(
        self, where: _Where, fields: dict[str, Node], action: Action
    ) -> tuple[Executable, ...]:
        """``executables``: files whose processes alone the rule lets through (checked as
        :func:`proxy.policy.executables.check_executable` says)."""
        if "executables" not in fields:
            return ()
        node = fields["executables"]
        if action is Action.DENY:
            self.problem(
                where.at("executables"),
                node,
                "a deny rule applies to every process; binding it to executables would let the "
                "others through",
            )
            return ()
        items = self.sequence(where.at("executables"), node)
        if not items:
            self.problem(where.at("executables"), node, "empty list matches no process")
        found: list[Executable] = []
        for item in items:
            text = self.string(where.at("executables"), item)
            if text is None:
                continue
            try:
                found.append(check_executable(text))
            except ValueError as exc:
                self.problem(where.at("executables"), item, str(exc))
        return tuple(dict.fromkeys(found))

    def request_conditions(
        self, where: _Where, node: Node, fields: dict[str, Node], action: Action
    ) -> RequestConditions | None:
        if not REQUEST_KEYS & fields.keys():
            return None
        methods: frozenset[str] | None = None
        if "methods" in fields:
            methods = frozenset(self.methods(where.at("methods"), fields["methods"]))
        # A deny rule ignores case unless told otherwise: a router that does (Express's default)
        # runs /GraphQL as /graphql, and a deny rule must not be stepped around by a spelling.
        insensitive = action is Action.DENY
        if "paths_case" in fields:
            text = self.string(where.at("paths_case"), fields["paths_case"])
            if text not in (None, "sensitive", "insensitive"):
                self.problem(
                    where.at("paths_case"),
                    fields["paths_case"],
                    f"{text!r} is not sensitive or insensitive",
                )
            insensitive = text == "insensitive"
            if "paths" not in fields:
                self.problem(where.at("paths_case"), fields["paths_case"], "needs 'paths'")
        paths: tuple[PathGlob, ...] | None = None
        if "paths" in fields:
            globs: list[PathGlob] = []
            for item in self.nonempty(where.at("paths"), fields["paths"]):
                text = self.string(where.at("paths"), item)
                if text is None:
                    continue
                try:
                    globs.append(compile_glob(text, insensitive=insensitive))
                except ValueError as exc:
                    self.problem(where.at("paths"), item, str(exc))
            paths = tuple(globs)
        query = self.string_sets(where.at("query"), fields.get("query"), QUERY_NAME, "parameter")
        websocket: bool | None = None
        if "websocket" in fields:
            websocket = self.boolean(where.at("websocket"), fields["websocket"])
        limit: int | None = None
        if "max_request_bytes" in fields:
            limit = self.integer(where.at("max_request_bytes"), fields["max_request_bytes"])
            if limit is not None and limit < 0:
                self.problem(
                    where.at("max_request_bytes"), fields["max_request_bytes"], "must be >= 0"
                )
            if action is Action.DENY:
                self.problem(
                    where.at("max_request_bytes"),
                    fields["max_request_bytes"],
                    "a size limit narrows what an allow rule allows; a deny rule cannot use it",
                )
        operations: frozenset[str] | None = None
        if "graphql_operations" in fields:
            found: set[str] = set()
            for item in self.nonempty(where.at("graphql_operations"), fields["graphql_operations"]):
                text = self.string(where.at("graphql_operations"), item)
                if text is None:
                    continue
                if text not in GRAPHQL_OPERATIONS:
                    self.problem(
                        where.at("graphql_operations"),
                        item,
                        f"{text!r} is not an operation type (query, mutation, subscription)",
                    )
                found.add(text)
            operations = frozenset(found)
        json_body = self.string_sets(
            where.at("json_body"), fields.get("json_body"), QUERY_NAME, "field"
        )
        return RequestConditions(
            methods=methods,
            paths=paths,
            query=query,
            websocket=websocket,
            max_request_bytes=limit,
            graphql_operations=operations,
            json_body=json_body,
        )

    def methods(self, where: _Where, node: Node) -> list[str]:
        out: list[str] = []
        for item in self.nonempty(where, node):
            text = self.string(where, item)
            if text is None:
                continue
            if not METHOD.fullmatch(text):
                self.problem(where, item, f"{text!r} is not an HTTP method")
                continue
            if text != text.upper():
                self.problem(where, item, f"{text!r}: write methods in upper case ({text.upper()})")
            out.append(text.upper())
        return out

    def nonempty(self, where: _Where, node: Node) -> list[Node]:
        items = self.sequence(where, node)
        if not items and isinstance(node, SequenceNode):
            self.problem(where, node, "an empty list matches nothing; list values or drop the key")
        return items

    def string_sets(
        self, where: _Where, node: Node | None, name_pattern: re.Pattern[str], what: str
    ) -> tuple[tuple[str, frozenset[str]], ...]:
        """``{name: value}`` or ``{name: [value, ...]}``: each name must have one of its values."""
        if node is None:
            return ()
        if not isinstance(node, MappingNode) or node.tag != _MAP_TAG:
            self.problem(
                where, node, f"expected a mapping of {what} to value(s), got {_describe(node)}"
            )
            return ()
        out: list[tuple[str, frozenset[str]]] = []
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = _scalar_str(key_node)
            if key is None or not name_pattern.fullmatch(key):
                self.problem(where, key_node, f"{_describe(key_node)} is not a {what} name")
                continue
            if key.lower() in seen:
                self.problem(
                    where, key_node, f"duplicate {what} {key!r} (first on line {seen[key.lower()]})"
                )
                continue
            seen[key.lower()] = key_node.start_mark.line + 1
            if isinstance(value_node, SequenceNode):
                values = [self.string(where, item) for item in self.nonempty(where, value_node)]
            else:
                values = [self.string(where, value_node)]
            accepted = frozenset(v for v in values if v is not None)
            if accepted:
                out.append((key, accepted))
        if not node.value:
            self.problem(where, node, "an empty mapping matches everything; drop the key")
        return tuple(out)

    def boolean(self, where: _Where, node: Node) -> bool | None:
        value = yamlnodes.boolean(node)  # (None too for "!!bool maybe")
        if value is not None:
            return value
        self.problem(where, node, f"expected true or false, got {_describe(node)}")
        return None

    def ask_settings(
        self, where: _Where, fields: dict[str, Node], action: Action
    ) -> tuple[int, Review]:
        """``timeout`` (seconds) and ``review`` (human or auto) of an ask rule; on any other rule they
        would suggest a wait that never happens, so they are refused there."""
        timeout, review = DEFAULT_ASK_TIMEOUT, Review.HUMAN
        for key in sorted(ASK_KEYS & fields.keys()):
            if action is not Action.ASK:
                self.problem(where.at(key), fields[key], "only 'action: ask' rules take this key")
        if action is not Action.ASK:
            return timeout, review
        if "timeout" in fields:
            value = self.integer(where.at("timeout"), fields["timeout"])
            if value is not None and not 1 <= value <= MAX_ASK_TIMEOUT:
                self.problem(
                    where.at("timeout"),
                    fields["timeout"],
                    f"{value} is not a timeout (1-{MAX_ASK_TIMEOUT} seconds)",
                )
            elif value is not None:
                timeout = value
        if "review" in fields:
            text = self.string(where.at("review"), fields["review"])
            if text is not None:
                try:
                    review = Review(text)
                except ValueError:
                    self.problem(
                        where.at("review"), fields["review"], f"{text!r} is not human or auto"
                    )
        return timeout, review

    # -- typed values ---------------------------------------------------------------------------

    def mapping(
        self, where: _Where, node: Node, allowed: frozenset[str], what: str
    ) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode) or node.tag != _MAP_TAG:
            self.problem(where, node, f"expected {what} (a mapping), got {_describe(node)}")
            return None
        fields: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = _scalar_str(key_node)
            if key is None:
                self.problem(where, key_node, f"keys must be strings, got {_describe(key_node)}")
                continue
            if key in fields:
                first = fields[key].start_mark.line + 1
                self.problem(where.at(key), key_node, f"duplicate key (first set on line {first})")
                continue
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.problem(where.at(key), key_node, f"unknown key (expected one of: {known})")
                continue
            fields[key] = value_node
        return fields

    def sequence(self, where: _Where, node: Node | None) -> list[Node]:
        if node is None:
            return []
        if not isinstance(node, SequenceNode) or node.tag != _SEQ_TAG:
            self.problem(where, node, f"expected a list, got {_describe(node)}")
            return []
        return list(node.value)

    def string(self, where: _Where, node: Node) -> str | None:
        value = _scalar_str(node)
        if value is None:
            self.problem(where, node, f"expected a string, got {_describe(node)}")
        return value

    def integer(self, where: _Where, node: Node) -> int | None:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            if not _DECIMAL.fullmatch(str(node.value)):
                # YAML 1.1 reads 0443 as octal (291) and 1:20 as base 60 (80): a reviewer reads
                # 443 and 1:20, the gate would enforce something else.
                self.problem(
                    where,
                    node,
                    f"write {str(node.value)!r} in decimal, without a leading zero, '+', '_', "
                    "':' or base prefix (YAML reads 0443 as 291)",
                )
                return None
            try:
                value = yamlnodes.scalar(node)
            except (yamlnodes.YAMLError, ValueError):
                value = None
            if type(value) is int:
                return value
        self.problem(where, node, f"expected an integer, got {_describe(node)}")
        return None

    def network(self, where: _Where, node: Node) -> IPNetwork | None:
        text = self.string(where, node)
        if text is None:
            return None
        try:
            net = ip_network(text.strip(), strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ip_network(text.strip(), strict=False)
                self.problem(where, node, f"{text!r} has host bits set; did you mean '{loose}'?")
            else:
                self.problem(where, node, f"{text!r} is not a network (e.g. 203.0.113.0/24)")
            return None
        if isinstance(net, IPv6Network) and net.subnet_of(_IPV4_MAPPED):
            self.problem(
                where, node, f"{text!r} is IPv4-mapped IPv6 and never matches; write the IPv4 form"
            )
            return None
        return net


def _get(node: MappingNode, key: str) -> Node | None:
    for key_node, value_node in node.value:
        if _scalar_str(key_node) == key:
            found: Node = value_node
            return found
    return None


def _scalar_str(node: Node) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return str(node.value)
    return None


def _describe(node: Node | None) -> str:
    if node is None:
        return "nothing"
    if isinstance(node, MappingNode):
        return "a mapping" if node.tag == _MAP_TAG else f"a mapping tagged {node.tag}"
    if isinstance(node, SequenceNode):
        return "a list" if node.tag == _SEQ_TAG else f"a list tagged {node.tag}"
    name = _TYPE_NAMES.get(node.tag, f"a value tagged {node.tag}")
    value = str(node.value)
    shown = value if len(value) <= 40 else value[:40] + "..."
    return f"{name} ({shown!r})" if value else name
