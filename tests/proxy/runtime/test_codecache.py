"""The dataclasses' code table: the classes it builds are the ones the compiler builds, it is used
only when it can be trusted as the package's bytecode is, and this interpreter's ``dataclasses``
still goes through it (the test that fails on an interpreter upgrade that changes that)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.runtime import codecache

ROOT = Path(__file__).resolve().parents[3]


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """The table, counters and recording of this block's own; ``dataclasses`` through the table."""
    saved = dict(codecache._table), dict(codecache.stats), codecache._recorded
    had = dataclasses.__dict__.get("exec")
    codecache._table.clear()
    codecache.stats.update(hits=0, misses=0)
    codecache._recorded = None
    dataclasses.exec = codecache._exec  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had is None:
            del dataclasses.exec  # type: ignore[attr-defined]
        else:
            dataclasses.exec = had  # type: ignore[attr-defined]
        codecache._table.clear()
        codecache._table.update(saved[0])
        codecache.stats.update(saved[1])
        codecache._recorded = saved[2]


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Path]:
    with isolated():
        yield tmp_path / "table.bin"


def define(source: str, module: str = "proxy.test_codecache_classes") -> type[Any]:
    """A class defined in a module named ``module`` (the table records the package's own)."""
    namespace = types.ModuleType(module)
    namespace.dataclasses = dataclasses  # type: ignore[attr-defined]
    sys.modules[module] = namespace
    try:
        exec(textwrap.dedent(source), namespace.__dict__)
    finally:
        del sys.modules[module]
    cls: type[Any] = namespace.C
    return cls


def functions(cls: type[Any]) -> dict[str, Any]:
    found = {}
    for name, value in vars(cls).items():
        function = getattr(value, "__wrapped__", value)  # __repr__ is wrapped by recursive_repr
        if isinstance(function, FunctionType):
            found[name] = function.__code__
    return found


OPTIONS = st.fixed_dictionaries(
    {
        "frozen": st.booleans(),
        "slots": st.booleans(),
        "eq": st.booleans(),
        "order": st.booleans(),
        "repr": st.booleans(),
        "kw_only": st.booleans(),
    }
).filter(lambda o: o["eq"] or not o["order"])
FIELDS = st.lists(
    st.sampled_from(
        ["int", "int = 3", "str = 'x'", "list[int] = dataclasses.field(default_factory=list)"]
    ),
    max_size=6,
)


def source_of(options: dict[str, bool], fields: list[str]) -> str:
    arguments = ", ".join(f"{key}={value}" for key, value in options.items())
    if not options["kw_only"]:  # a field without a default may not follow one with a default
        fields = sorted(fields, key=lambda f: "=" in f)
    body = "\n".join(f"    f{index}: {kind}" for index, kind in enumerate(fields)) or "    pass"
    return f"@dataclasses.dataclass({arguments})\nclass C:\n{body}\n"


@given(OPTIONS, FIELDS)
def test_a_class_built_from_the_table_has_the_code_the_compiler_gives_it(
    options: dict[str, bool], fields: list[str]
) -> None:
    source = source_of(options, fields)
    with isolated():
        codecache.record()
        compiled = define(source)
        texts = codecache.stats["misses"]  # 1 on CPython 3.13, one per method on 3.12
        assert texts >= 1
        assert codecache.stats["hits"] == 0
        codecache._table.update(codecache._recorded or {})
        cached = define(source)
        assert codecache.stats == {"hits": texts, "misses": texts}
    assert functions(cached) == functions(compiled)
    assert "__init__" in functions(compiled)
    assert [
        (f.name, f.default, f.default_factory, f.kw_only) for f in dataclasses.fields(cached)
    ] == [(f.name, f.default, f.default_factory, f.kw_only) for f in dataclasses.fields(compiled)]


def test_this_interpreters_dataclasses_compiles_through_the_table(table: Path) -> None:
    """Fails when ``dataclasses`` no longer calls ``exec`` from its module: the table would then
    silently never be used (see proxy/runtime/codecache.py)."""
    source = (
        "@dataclasses.dataclass(frozen=True, slots=True)\nclass C:\n    a: int\n    b: str = ''\n"
    )
    codecache.record()
    first = define(source)
    texts = codecache.stats["misses"]
    assert texts >= 1
    assert codecache.stats["hits"] == 0
    assert codecache.write(str(table)) == texts
    codecache._table.clear()
    codecache._table.update(codecache.load(str(table)))
    second = define(source)
    assert codecache.stats == {"hits": texts, "misses": texts}
    assert second(1, "x") == second(1, "x") != second(2)
    assert repr(second(1, "x")) == repr(first(1, "x")).replace(first.__qualname__, "C")
    with pytest.raises(dataclasses.FrozenInstanceError):
        second(1).a = 2  # type: ignore[misc]
    assert hash(second(1, "x")) == hash(first(1, "x"))


def test_only_the_packages_own_classes_are_kept(table: Path) -> None:
    codecache.record()
    define("@dataclasses.dataclass\nclass C:\n    a: int\n", module="somebody_else")
    others = codecache.stats["misses"]
    define("@dataclasses.dataclass\nclass C:\n    a: int\n    b: int = 0\n")
    assert codecache.write(str(table)) == codecache.stats["misses"] - others >= 1


def test_the_table_is_written_for_its_owner_only_and_read_back(table: Path) -> None:
    codecache.record()
    define("@dataclasses.dataclass\nclass C:\n    a: int\n")
    old = os.umask(0o077)
    try:
        assert codecache.write(str(table)) == codecache.stats["misses"]
    finally:
        os.umask(old)
    assert table.stat().st_mode & 0o777 == 0o644
    assert codecache.load(str(table)) == codecache._recorded
    assert [p.name for p in table.parent.iterdir()] == [table.name]


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_table_others_may_write_is_not_used(table: Path, mode: int) -> None:
    codecache.record()
    define("@dataclasses.dataclass\nclass C:\n    a: int\n")
    codecache.write(str(table))
    assert codecache.load(str(table))
    table.chmod(mode)
    assert codecache.load(str(table)) == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the table to another user needs root")
def test_a_table_another_user_owns_is_not_used(table: Path) -> None:
    codecache.record()
    define("@dataclasses.dataclass\nclass C:\n    a: int\n")
    codecache.write(str(table))
    os.chown(table, 65534, 65534)
    assert codecache.load(str(table)) == {}  # root reads it, but nobody's file is not root's code


def test_a_table_from_another_interpreter_or_damaged_is_not_used(table: Path) -> None:
    codecache.record()
    define("@dataclasses.dataclass\nclass C:\n    a: int\n")
    codecache.write(str(table))
    data = table.read_bytes()
    table.write_bytes(data.replace(sys.version.encode(), b"3.0.0 (another build)"))
    assert codecache.load(str(table)) == {}
    table.write_bytes(data[: len(data) // 2])
    assert codecache.load(str(table)) == {}
    assert codecache.load(str(table.parent / "missing.bin")) == {}


def test_a_damaged_entry_is_compiled_instead(table: Path) -> None:
    source = "@dataclasses.dataclass\nclass C:\n    a: int\n"
    codecache.record()
    define(source)
    texts = codecache.stats["misses"]
    codecache._table.update(dict.fromkeys(codecache._recorded or {}, b"not marshalled code"))
    cls = define(source)
    assert cls(1) == cls(1)
    assert codecache.stats == {"hits": 0, "misses": 2 * texts}


def test_after_the_table_is_written_the_gates_modules_compile_no_class(tmp_path: Path) -> None:
    """The table ``make venv`` writes covers every class the package defines: a fresh process with
    it installed imports the gate and the policy loader without compiling a method."""
    path = tmp_path / "table.bin"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    warm = f"from proxy.runtime import codecache; print(codecache.warm({str(path)!r}))"
    out = subprocess.run(
        [sys.executable, "-c", warm], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.split()[-1]) > 50
    use = (
        f"from proxy.runtime import codecache; codecache.install({str(path)!r})\n"
        "import addons.master, proxy.policy.managed, proxy.app.private_gate, proxy.evidence.emit\n"
        "print(codecache.stats['hits'], codecache.stats['misses'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", use], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    hits, misses = map(int, out.stdout.split())
    assert hits > 30
    assert misses == 0


def test_a_table_that_cannot_be_written_is_said_and_stops_nothing(tmp_path: Path) -> None:
    """``make venv`` and the image build go on: without the table classes compile as before."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "table.bin"  # its directory is a file
    script = f"from proxy.runtime import codecache; raise SystemExit(codecache.main({str(path)!r}))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert f"not written, {path}" in out.stderr
    assert not path.exists()


def test_egress_commands_install_the_table() -> None:
    script = (
        "import contextlib, io\n"
        "from proxy.app.cli import main\n"
        "from proxy.runtime import codecache\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['check', '--help'])\n"
        "print(codecache.installed())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True"]
