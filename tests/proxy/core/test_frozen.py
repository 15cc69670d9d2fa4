"""Fast construction of frozen slots dataclasses: the same instances as the dataclass's own __init__,
the same signature, still frozen."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.frozen import ORIGINAL_INIT, Replacer, builder, fast_init

TEXT = st.none() | st.text(max_size=20)
NUMBER = st.none() | st.integers(min_value=-(2**40), max_value=2**40)


def _value(field: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    kind = str(field.type)
    if field.name == "decision":
        return st.sampled_from(list(Verdict))
    if field.name == "reason":
        return st.sampled_from(list(Reason))
    if field.name == "kind":
        return st.sampled_from(list(Kind))
    if field.name == "ts":
        return st.floats(allow_nan=False)
    if "int" in kind:
        return NUMBER
    if "tuple" in kind:
        return st.none() | st.tuples(st.text(max_size=5))
    if "Mapping" in kind:
        return st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
    return TEXT


def _arguments(cls: type[Any]) -> st.SearchStrategy[list[Any]]:
    return st.tuples(*(_value(f) for f in dataclasses.fields(cls))).map(list)


def _built_by_dataclass(cls: type[Any], args: list[Any]) -> Any:
    made = object.__new__(cls)
    ORIGINAL_INIT[cls](made, *args)
    return made


@pytest.mark.parametrize("cls", [Decision, Request])
def test_the_signature_is_the_dataclass_signature(cls: type[Any]) -> None:
    ours = inspect.signature(cls.__init__)
    theirs = inspect.signature(ORIGINAL_INIT[cls])
    assert [(p.name, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.kind) for p in theirs.parameters.values()
    ]
    for name, param in ours.parameters.items():
        other = theirs.parameters[name].default
        if repr(other) == "<factory>":
            assert repr(param.default) == "<factory>"
        else:
            assert param.default is other


@given(_arguments(Decision))
def test_a_decision_is_built_as_the_dataclass_builds_it(args: list[Any]) -> None:
    assert Decision(*args) == _built_by_dataclass(Decision, args)
    names = [f.name for f in dataclasses.fields(Decision)]
    assert Decision(**dict(zip(names, args, strict=True))) == Decision(*args)


@given(_arguments(Request))
def test_a_request_is_built_as_the_dataclass_builds_it(args: list[Any]) -> None:
    assert Request(*args) == _built_by_dataclass(Request, args)


def test_default_factories_run_per_instance() -> None:
    a = Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce")
    b = Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce")
    assert a.id != b.id and len(a.id) == 32 and isinstance(a.ts, float)
    assert a.method is None and a.context is None
    given_id = Decision(
        Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce", id="x"
    )
    assert given_id.id == "x"


def test_missing_or_unknown_arguments_are_refused_as_before() -> None:
    with pytest.raises(TypeError):
        Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Request(Kind.CONNECT, "h", nonsense=1)  # type: ignore[call-arg]


def test_instances_stay_frozen() -> None:
    request = Request(Kind.CONNECT, "h", 443)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.host = "other"  # type: ignore[misc]


@given(_arguments(Decision), st.data())
def test_with_is_dataclasses_replace(args: list[Any], data: st.DataObject) -> None:
    decision = Decision(*args)
    fields = dataclasses.fields(Decision)
    chosen = data.draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.name, max_size=5))
    changes = {f.name: data.draw(_value(f)) for f in chosen}
    assert decision.with_(**changes) == dataclasses.replace(decision, **changes)


def test_with_refuses_unknown_fields_like_replace() -> None:
    decision = Decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 1, "v", "e")
    with pytest.raises(TypeError):
        decision.with_(nonsense=1)


def test_only_plain_frozen_slots_dataclasses_are_accepted() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = dataclasses.field(kw_only=True)

    for cls in (NoSlots, NotFrozen, PostInit, KeywordOnly):
        with pytest.raises(TypeError):
            fast_init(cls)


def test_replacer_copies_every_field() -> None:
    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Pair:
        a: int
        b: str = "b"

    replace = Replacer(Pair)
    assert replace(Pair(1), {"b": "c"}) == Pair(1, "c")
    assert replace(Pair(1, "x"), {}) == Pair(1, "x")


def test_copies_are_frozen_and_replace_whatever_fields_change() -> None:
    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Many:
        a: int
        b: int = 0
        c: int = 0
        d: int = 0
        e: int = 0
        f: int = 0
        g: int = 0

    replace = Replacer(Many)
    names = [f.name for f in dataclasses.fields(Many)]
    sets = [tuple(names[i] for i in range(7) if mask >> i & 1) for mask in range(1, 128)]
    original = Many(1, 2, 3, 4, 5, 6, 7)
    for chosen in sets:
        changes = {name: -i for i, name in enumerate(chosen)}
        copied = replace(original, changes)
        assert copied == dataclasses.replace(original, **changes)
        assert type(copied) is Many
        with pytest.raises(dataclasses.FrozenInstanceError):
            copied.a = 0  # type: ignore[misc]
    with pytest.raises(TypeError):  # a name that is not a field, after one that is
        replace(original, {"a": 1, "z": 2})
    assert original == Many(1, 2, 3, 4, 5, 6, 7)  # and the original never changes


def test_a_class_whose_layout_no_twin_shares_is_built_slot_by_slot() -> None:
    class Base:
        __slots__ = ("base",)

    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived(Base):
        a: int
        b: str = "b"

    made = Derived(1)
    assert (made.a, made.b, type(made)) == (1, "b", Derived)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.a = 2  # type: ignore[misc]
    built = builder(Derived)(1)  # the builder of such a class is the class itself
    assert (built.a, built.b, type(built)) == (1, "b", Derived)
    copied = Replacer(Derived)(made, {"b": "c"})  # copied through its builder
    assert (copied.a, copied.b, type(copied)) == (1, "c", Derived)
    with pytest.raises(dataclasses.FrozenInstanceError):
        copied.b = "d"  # type: ignore[misc]


def test_a_subclass_keeps_its_own_class() -> None:
    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class Parent:
        a: int

    class Child(Parent):
        __slots__ = ()

    child = Child(1)
    assert type(child) is Child and child.a == 1
    assert type(Parent(2)) is Parent
    copied = Replacer(Parent)(child, {"a": 2})  # and a copy of it too
    assert type(copied) is Child and copied.a == 2


def test_a_failing_default_factory_fails_the_construction() -> None:
    def broken() -> str:
        raise RuntimeError("no id")

    @fast_init
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        a: int
        b: str = dataclasses.field(default_factory=broken)

    with pytest.raises(RuntimeError):
        WithFactory(1)
    assert WithFactory(1, "given").b == "given"


@given(_arguments(Decision))
def test_the_builder_builds_what_the_class_builds(args: list[Any]) -> None:
    built = builder(Decision)(*args)
    assert type(built) is Decision
    assert built == Decision(*args) == _built_by_dataclass(Decision, args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.host = "other"  # type: ignore[misc]


def test_the_builder_runs_default_factories_and_checks_arguments() -> None:
    build = builder(Decision)
    a = build(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce")
    b = build(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "r", Kind.CONNECT, "h", 443, "v", "enforce")
    assert a.id != b.id and isinstance(a.ts, float) and a.pid is None
    with pytest.raises(TypeError):
        build(Verdict.ALLOW)


def test_a_builder_exists_only_for_fast_init_classes() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Plain:
        a: int

    with pytest.raises(TypeError, match="Plain"):
        builder(Plain)


def test_field_names_of_the_generated_code_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Clashing:
        _twin: int

    with pytest.raises(TypeError, match="clashes"):
        fast_init(Clashing)
