"""One registry shape for every kind of plugin: edit algorithms and probe families.

A plugin class registers under a lowercase snake name (equal to its config file name) with the
registry's decorator, or from a third-party package through the registry's entry-point group
(``name = "package.module:Class"``), loaded on the first lookup. A name is taken by a class, which
is identified by its module and qualified name: a module reload may register the re-created class
again, another class under a taken name is refused. A broken or clashing entry-point plugin is
logged and skipped, so it cannot hide the built-in ones.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

T = TypeVar("T", bound=type)


def same_class(a: type, b: Any) -> bool:
    """Same module and qualified name: the same class, possibly re-created by a module reload. Two
    classes with one qualname in different modules are different."""
    return (a.__module__, a.__qualname__) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


class Registry(Generic[T]):
    """Name -> class of one kind of plugin.

    Args:
        kind: what is registered, for messages (``"algorithm"``, ``"probe family"``).
        base: the class every plugin must subclass.
        group: the entry-point group third-party packages register through.
        decorator: the decorator's public name, for messages.
        check: called as ``check(name, cls)`` before a class is registered (may raise).
    """

    def __init__(self, kind: str, base: type, group: str, decorator: str,
                 check: Callable[[str, type], None] | None = None) -> None:
        self.kind, self.base, self.group, self.decorator, self.check = kind, base, group, decorator, check
        self.classes: dict[str, T] = {}
        self.entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register a ``base`` subclass under ``name`` (sets ``cls.name``).

        Raises:
            ValueError: a malformed name, or a name already taken by another class.
            TypeError: not a subclass of ``base``.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase snake case ([a-z][a-z0-9_]*)")

        def deco(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@{self.decorator}({name!r}) needs a {self.base.__name__} subclass, got {cls!r}")
            old = self.classes.get(name)
            if old is not None and not same_class(old, cls):
                raise ValueError(f"{self.kind} name {name!r} is already registered to {old.__module__}."
                                 f"{old.__qualname__}; cannot register {cls.__module__}.{cls.__qualname__} under it")
            if self.check is not None:
                self.check(name, cls)
            cls.name = name
            self.classes[name] = cls
            return cls

        return deco

    def load_entry_points(self) -> None:
        """Register the entry-point plugins of ``group`` (once)."""
        if self.entry_points_loaded:
            return
        self.entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            try:
                cls = ep.load()
                old = self.classes.get(ep.name)
                if old is None:
                    self.register(ep.name)(cls)
                elif not same_class(old, cls):
                    log.error("%s plugin %s = %s not loaded: the name is already registered to %s.%s",
                              self.kind, ep.name, ep.value, old.__module__, old.__qualname__)
            except Exception as exc:  # a broken plugin must not hide the built-in ones
                log.error("could not load %s plugin %s = %s: %s", self.kind, ep.name, ep.value, exc)

    def names(self) -> list[str]:
        """Registered names (built-in and entry-point plugins), in registration order."""
        self.load_entry_points()
        return list(self.classes)

    def get(self, name: str) -> T:
        """The class registered under ``name``.

        Raises:
            KeyError: unknown name; the message lists the registered ones.
        """
        self.load_entry_points()
        if name not in self.classes:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))}")
        return self.classes[name]

    def __iter__(self) -> Iterator[tuple[str, T]]:
        self.load_entry_points()
        return iter(list(self.classes.items()))
