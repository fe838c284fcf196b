"""``Record``: the frozen, slotted value objects of the hit path, without generating code at import.

``@dataclass(frozen=True)`` writes and compiles ``__init__``, ``__eq__``, ``__hash__`` and ``__repr__`` for
every class when the module is imported: measured here, six small frozen dataclasses cost ~10 ms of CPU,
about half of what ``import ctxcache`` used to add to an app's launch. A ``Record`` subclass declares its
``__slots__`` and a typed ``__init__`` that calls :meth:`_set`; equality, hashing, ``repr`` and
:meth:`replace` are shared and read the slots.
"""

from __future__ import annotations

from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    __slots__ = ()

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        found = cls.__dict__.get("_record_fields")
        if found is None:
            names: list[str] = []
            for klass in reversed(cls.__mro__):
                for name in klass.__dict__.get("__slots__", ()):
                    if not name.startswith("_"):
                        names.append(name)
            found = tuple(names)
            type.__setattr__(cls, "_record_fields", found)
        return found

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields()) + ")"

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes`` (as ``dataclasses.replace``)."""
        values = {n: getattr(self, n) for n in self._fields()}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return type(self)(**values)

    def __copy__(self: R) -> R:
        return self

    def __deepcopy__(self: R, memo: dict[int, Any]) -> R:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), {n: getattr(self, n) for n in self._fields()}))


def _rebuild(cls: type[R], values: dict[str, Any]) -> R:
    return cls(**values)
