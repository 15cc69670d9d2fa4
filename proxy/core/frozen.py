"""Frozen slots dataclasses that are cheap to build: one decision per request is built, and copied with
a field changed, several times per connection.

The ``__init__`` a frozen dataclass gets sets every field through ``object.__setattr__`` (its own
``__setattr__`` refuses), which for a class of forty fields costs more than the rest of a decision
together. :func:`fast_init` replaces it with one of the same signature, defaults and default factories
that fills the slots while the instance is, for the length of ``__init__``, of a plain twin class with
the same slots (so each field is an ordinary attribute store), and gives it back its frozen class before
it returns. Where the interpreter refuses that (a class whose layout a twin cannot share) each slot is
written through its descriptor instead. :func:`builder` gives the hot paths a function with the same
parameters that builds an instance as a twin and gives it its class once (each ``__class__``
assignment checks both layouts, about a fifth of building a decision). :class:`Replacer` copies an
instance with some fields changed without passing every field by keyword, as ``dataclasses.replace``
does. Outside ``__init__`` instances are what the dataclass makes them: frozen (assigning a field
raises ``FrozenInstanceError``), equal, hashed and printed the same.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from proxy.runtime import codecache


class _Factory:
    """The default of a parameter whose field has a default factory (shown as in dataclasses)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()

ORIGINAL_INIT: dict[type[Any], Callable[..., None]] = {}
"""The dataclass-generated ``__init__`` each class had (tests build instances both ways)."""

_BUILDERS: dict[type[Any], Callable[..., Any]] = {}
_TWINS: dict[type[Any], type[Any]] = {}  # the twin each class is built as, where it has one
_SET_CLASS = object.__setattr__


def fast_init[T](cls: type[T]) -> type[T]:
    """Give the frozen slots dataclass ``cls`` a faster ``__init__`` with the same signature.

    Only plain fields are supported (no ``init=False``, keyword-only or ``InitVar`` fields, no
    ``__post_init__``): anything else raises TypeError here, at import, rather than building
    instances differently from the dataclass."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen slots dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has __post_init__, which fast_init does not call")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    namespace: dict[str, Any] = {
        "_FACTORY": _FACTORY,
        "_cls": cls,
        "_setattr": object.__setattr__,
        "_original": cls.__init__,
    }
    signature: list[str] = []
    values: list[str] = []
    for index, f in enumerate(fields):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain fields are supported")
        if not isinstance(cls.__dict__.get(f.name), types.MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{f.name} is not a slot")
        value = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default{index}"] = f.default
            signature.append(f"{f.name}=_default{index}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory{index}"] = f.default_factory
            signature.append(f"{f.name}=_FACTORY")
            value = f"_factory{index}() if {f.name} is _FACTORY else {f.name}"
        else:
            signature.append(f.name)
        values.append(value)
    # The generated functions' own names all start with "_" (and "self" is the built instance).
    if any(f.name.startswith("_") or f.name == "self" for f in fields):
        raise TypeError(f"{cls.__name__}: a field name clashes with fast_init's own names")
    names = [f.name for f in fields]
    twin = _twin(cls)
    stores = [f"    self.{name} = {value}" for name, value in zip(names, values, strict=True)]
    if twin is not None:
        _TWINS[cls] = twin
        namespace["_twin"] = twin
        namespace["_new"] = object.__new__
        build = [
            f"def _build({', '.join(signature)}):",
            "    self = _new(_twin)",
            *stores,
            "    _setattr(self, '__class__', _cls)",
            "    return self",
        ]
        # A subclass keeps the dataclass's own way: the twin would turn it into ``cls``.
        body = [
            "    if self.__class__ is not _cls:",
            f"        return _original(self, {', '.join(names)})",
            "    _setattr(self, '__class__', _twin)",
            *stores,
            "    _setattr(self, '__class__', _cls)",
        ]
    else:
        for index, name in enumerate(names):
            namespace[f"_set{index}"] = cls.__dict__[name].__set__
        body = [f"    _set{index}(self, {value})" for index, value in enumerate(values)]
        namespace["_make"] = cls
        build = [f"def _build({', '.join(signature)}):", f"    return _make({', '.join(names)})"]
    source = f"def __init__(self, {', '.join(signature)}):\n" + "\n".join(body) + "\n"
    source += "\n".join(build) + "\n"
    exec(codecache.compiled(source), namespace)  # as dataclasses builds __init__
    init: Callable[..., None] = namespace["__init__"]
    original = cls.__init__
    init.__qualname__ = original.__qualname__
    init.__module__ = original.__module__
    init.__doc__ = original.__doc__
    init.__annotations__ = dict(original.__annotations__)
    ORIGINAL_INIT[cls] = original
    _BUILDERS[cls] = namespace["_build"]
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def builder[T](cls: type[T]) -> Callable[..., T]:
    """A function taking ``cls``'s arguments that returns exactly what ``cls(...)`` would, built
    with one class check instead of two; for the few places that build one per request."""
    try:
        return _BUILDERS[cls]
    except KeyError:
        raise TypeError(f"{cls.__name__} was not given fast_init") from None


def _twin(cls: type[Any]) -> type[Any] | None:
    """A plain class with exactly ``cls``'s slots that an instance of ``cls`` may take the class of
    and give it back (the interpreter checks the layouts match), or None."""
    if cls.__bases__ != (object,):
        return None
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": cls.__slots__})
    probe = object.__new__(cls)
    try:
        object.__setattr__(probe, "__class__", twin)
        object.__setattr__(probe, "__class__", cls)
    except TypeError:
        return None
    return twin


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """Every named attribute as a tuple (``attrgetter`` of one name gives the value, not a 1-tuple)."""
    if len(names) > 1:
        return attrgetter(*names)
    return lambda obj: tuple(getattr(obj, name) for name in names)


class Replacer:
    """``dataclasses.replace`` for one fast_init class: a copy with some fields changed.

    A decision is copied a few times on its way to the sinks (its address, its process): an
    instance of a class with a twin is copied slot by slot into a twin by a function compiled
    once for the class (as the builder builds one), the changed slots are set on it, and it is
    given its class, without a list of every value or a call that passes every field. Other
    classes and subclasses are built through the class from their values, as before."""

    def __init__(self, cls: type[Any]) -> None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        self._cls = cls
        self._build = builder(cls)
        self._values = _getter(names)
        self._index = {name: i for i, name in enumerate(names)}
        self._copy: Callable[[Any], Any] | None = None
        twin = _TWINS.get(cls)
        if twin is not None:
            namespace: dict[str, Any] = {"_new": object.__new__, "_twin": twin}
            stores = "".join(f"    self.{name} = _o.{name}\n" for name in names)
            source = f"def _copy(_o):\n    self = _new(_twin)\n{stores}    return self\n"
            exec(codecache.compiled(source), namespace)  # as fast_init's, at import
            self._copy = namespace["_copy"]

    def __call__[T](self, obj: T, changes: dict[str, Any]) -> T:
        index = self._index
        copy = self._copy
        if copy is not None and type(obj) is self._cls:
            twin = copy(obj)
            for name, value in changes.items():
                if name not in index:  # let dataclasses say what is wrong, as replace() would
                    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
                setattr(twin, name, value)
            _SET_CLASS(twin, "__class__", self._cls)
            copied: T = twin
            return copied
        values = list(self._values(obj))
        for name, value in changes.items():
            at = index.get(name)
            if at is None:  # let dataclasses say what is wrong, as replace() would
                return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
            values[at] = value
        if type(obj) is not self._cls:  # a subclass is built by its own class
            made: T = type(obj)(*values)
            return made
        built: T = self._build(*values)
        return built
