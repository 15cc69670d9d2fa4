"""Frozen slots dataclasses that are cheap to build: one decision per request is built, and copied with
a field changed, several times per connection.

The ``__init__`` a frozen dataclass gets sets every field through ``object.__setattr__`` (its own
``__setattr__`` refuses), which costs about as much as the rest of a decision together for a class of
forty fields. :func:`fast_init` replaces it with one that has the same signature, defaults and default
factories but writes each slot through the slot's own descriptor, and :func:`replace` copies an instance
with some fields changed without going through keyword arguments for every field, as
``dataclasses.replace`` does. Instances stay frozen: assigning to a field still raises
``FrozenInstanceError``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from operator import attrgetter
from typing import Any


class _Factory:
    """The default of a parameter whose field has a default factory (shown as in dataclasses)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()

ORIGINAL_INIT: dict[type[Any], Callable[..., None]] = {}
"""The dataclass-generated ``__init__`` each class had (tests build instances both ways)."""


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
    signature: list[str] = []
    body: list[str] = []
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY}
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for index, f in enumerate(fields):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain fields are supported")
        slot = cls.__dict__.get(f.name)
        if not isinstance(slot, types.MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{f.name} is not a slot")
        namespace[f"_set{index}"] = slot.__set__
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
        body.append(f"    _set{index}(self, {value})")
    if any(f.name in namespace or f.name == "self" for f in fields):
        raise TypeError(f"{cls.__name__}: a field name clashes with fast_init's own names")
    source = f"def __init__(self, {', '.join(signature)}):\n" + "\n".join(body) + "\n"
    exec(source, namespace)  # the same technique dataclasses uses to build __init__
    init: Callable[..., None] = namespace["__init__"]
    original = cls.__init__
    init.__qualname__ = original.__qualname__
    init.__module__ = original.__module__
    init.__doc__ = original.__doc__
    init.__annotations__ = dict(original.__annotations__)
    ORIGINAL_INIT[cls] = original
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class Replacer:
    """``dataclasses.replace`` for one fast_init class: a copy with some fields changed."""

    def __init__(self, cls: type[Any]) -> None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        self._cls = cls
        self._values = attrgetter(*names)
        self._index = {name: i for i, name in enumerate(names)}

    def __call__[T](self, obj: T, changes: dict[str, Any]) -> T:
        values = list(self._values(obj))
        index = self._index
        for name, value in changes.items():
            at = index.get(name)
            if at is None:  # let dataclasses say what is wrong, as replace() would
                return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
            values[at] = value
        made: T = self._cls(*values)
        return made
