"""Registries by name: what a recipe, a flag or a suite picks attacks and methods from.

A `Registry` is a read-only mapping name → class, filled by a class decorator.
Registering a name twice is an error (a silent overwrite would make the second
import decide which attack a name runs). `names(pattern)` lists names, with
shell-style wildcards as timm's `list_models('*resnet*')`; iterating gives them in
registration order.

A new method or attack is one new module in its package: `import_package_modules` imports
every module of the package (so the decorator runs), and `declared_names` reads the names
from the modules' source without importing them, for help texts that must not load torch.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
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


def import_package_modules(package: str, path: Iterable[str], first: Iterable[str] = ()) -> None:
    """Import the modules of `package` (whose `__path__` is `path`): those in `first` in that order,
    then every other one alphabetically, so a module dropped into the package registers itself
    without an import line anywhere, after the shipped ones."""
    found = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.ispkg)
    for name in [*first, *(n for n in found if n not in first)]:
        importlib.import_module(f"{package}.{name}")


def declared_names(package_dir: str | Path, decorator: str) -> list[str]:
    """Sorted names registered in the modules of `package_dir` with `decorator("name")` (as a
    decorator or a call), read from the source without importing it. The CLI lists the methods
    and attacks from this while it starts, before torch loads; a test keeps it equal to the
    registries that importing the packages fills."""
    names: set[str] = set()
    for path in sorted(Path(package_dir).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == decorator
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return sorted(names)
