"""Registries by name: what a recipe, a flag or a suite picks attacks and methods from.

A `Registry` is a read-only mapping name → class, filled by a class decorator.
Registering a name twice is an error (a silent overwrite would make the second
import decide which attack a name runs). `names(pattern)` lists names, with
shell-style wildcards as timm's `list_models('*resnet*')`.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make the class available as `name` and set its `name` attribute."""

        def deco(cls: T) -> T:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by "
                                 f"{self._items[name].__module__}.{self._items[name].__qualname__}")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return deco

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally only those matching a shell-style pattern."""
        found = sorted(self._items)
        return found if pattern is None else [n for n in found if fnmatch.fnmatchcase(n, pattern)]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
