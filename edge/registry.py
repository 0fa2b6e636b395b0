"""An immutable name → entry table: the one list of camera backends, denoise filters,
export formats.

Adding a backend, a filter or a format is one new module that declares its entry and
one line in the table that lists the built-in ones. A :class:`Registry` never changes
after it is made: :meth:`Registry.adding` returns a new one with one more entry, so a
test (or a program that brings its own backend) passes its own registry explicitly
and nothing leaks into the next test or thread. An unknown name is answered with the
known ones (and the closest, for a typo), in the error type the caller chooses.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from types import MappingProxyType
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in messages), in registration order.

    Iterating gives the names; ``registry[name]`` or :meth:`lookup` the entry.
    """

    __slots__ = ("_entries", "kind")

    def __init__(self, kind: str, entries: Iterable[tuple[str, T]] = ()) -> None:
        table: dict[str, T] = {}
        for name, entry in entries:
            if not name or name != name.strip():
                raise ValueError(f"{kind} names must be non-empty words, got {name!r}")
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            table[name] = entry
        self.kind = kind
        self._entries = MappingProxyType(table)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (for help texts and choices)."""
        return tuple(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def get(self, name: str) -> T | None:
        """The entry called ``name``, or None."""
        return self._entries.get(name)

    def unknown(self, name: object) -> str:
        """Why ``name`` is no entry: the known names, and the closest one to a typo."""
        known = ", ".join(self._entries) or "none"
        close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}; known: {known}{hint}"

    def lookup(self, name: str, error: type[Exception] = KeyError, where: str = "") -> T:
        """The entry called ``name``; otherwise ``error`` saying which names exist.

        ``where`` prefixes the message with the setting or option that named it
        (``"camera.backend"``), so the user knows what to change.
        """
        entry = self._entries.get(name)
        if entry is None:
            prefix = f"{where}: " if where else ""
            raise error(prefix + self.unknown(name))
        return entry

    def adding(self, name: str, entry: T) -> Registry[T]:
        """A new registry with ``entry`` added under ``name``; this one is unchanged."""
        return Registry(self.kind, [*self._entries.items(), (name, entry)])

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
