"""Frozen dataclasses that share one __eq__, __hash__, __repr__, __setattr__ and __delattr__ instead of each
compiling its own.

@dataclass(frozen=True) writes and compiles six methods for every class, at import: for the few dozen small
classes a supervisor imports before it serves, that was a good part of its start (issue 11). `@value` on a
subclass of `Value` is @dataclass(frozen=True) with five of them, which give the same results, taken from this
module: only __init__ is compiled per class. fields(), replace(), match and FrozenInstanceError work as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import FrozenInstanceError, dataclass


class Value:
    """The __eq__, __hash__ and __repr__ that @dataclass(frozen=True) would write, for every field."""

    __slots__ = ()
    _names: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return tuple(getattr(self, name) for name in self._names) == tuple(getattr(other, name) for name in self._names)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self._names))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names)
        return f"{self.__class__.__qualname__}({shown})"


def _frozen_setattr(self, name: str, value: object) -> None:
    """What @dataclass(frozen=True) writes for each class: its own instances take no attribute, a plain subclass's
    take any but a field."""
    if type(self).__dict__.get("__setattr__") is _frozen_setattr or name in type(self).__dataclass_fields__:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _frozen_delattr(self, name: str) -> None:
    if type(self).__dict__.get("__delattr__") is _frozen_delattr or name in type(self).__dataclass_fields__:
        raise FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


# dataclasses installs them under their __name__ and gives them the class's __qualname__ (put back after each class).
_frozen_setattr.__name__, _frozen_delattr.__name__ = "__setattr__", "__delattr__"


def _shared_frozen_methods(_cls: type, _fields: list, _globals: dict) -> tuple:
    return _frozen_setattr, _frozen_delattr


def value(cls: type) -> type:
    """@dataclass(frozen=True) with this module's __eq__, __hash__, __repr__, __setattr__ and __delattr__ (cls
    subclasses Value; no field may set compare, hash or repr: they all count)."""
    # dataclasses compiles a __setattr__ and a __delattr__ for each frozen class through _frozen_get_del_attr; while
    # this class is made it hands out the shared two instead (where a Python has no such hook, it compiles them).
    own = getattr(dataclasses, "_frozen_get_del_attr", None)
    if own is not None:
        dataclasses._frozen_get_del_attr = _shared_frozen_methods
    try:
        cls = dataclass(frozen=True, repr=False, eq=False)(cls)
    finally:
        if own is not None:
            dataclasses._frozen_get_del_attr = own
            _frozen_setattr.__qualname__, _frozen_delattr.__qualname__ = "Value.__setattr__", "Value.__delattr__"
    if not issubclass(cls, Value) or any(not (f.compare and f.repr and f.hash is None)
                                         for f in cls.__dataclass_fields__.values()):
        raise TypeError(f"@value: {cls.__qualname__} must subclass Value and keep every field's compare, repr, hash")
    cls._names = tuple(cls.__dataclass_fields__)
    return cls
