"""Frozen dataclasses that share one __eq__, __hash__ and __repr__ instead of each compiling its own.

@dataclass(frozen=True) writes and compiles six methods for every class, at import: for the few dozen small
classes a supervisor imports before it serves, that was a good part of its start (issue 11). `@value` on a
subclass of `Value` is @dataclass(frozen=True) with those three methods, which give the same results, taken
from the base class: fields(), replace(), match and FrozenInstanceError work as before.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def value(cls: type) -> type:
    """@dataclass(frozen=True) with Value's __eq__, __hash__ and __repr__ (cls subclasses Value; no field may set
    compare, hash or repr: they all count)."""
    cls = dataclass(frozen=True, repr=False, eq=False)(cls)
    if not issubclass(cls, Value) or any(not (f.compare and f.repr and f.hash is None)
                                         for f in cls.__dataclass_fields__.values()):
        raise TypeError(f"@value: {cls.__qualname__} must subclass Value and keep every field's compare, repr, hash")
    cls._names = tuple(cls.__dataclass_fields__)
    return cls
