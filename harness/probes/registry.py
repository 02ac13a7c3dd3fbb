"""The probe family registry: ``@register_probe("name")``, the ``harness.probes`` entry-point group,
and the metric metadata every table reads.

The same shape as the algorithm registry (``harness.algorithms.base``): a lowercase snake name per
family, equal to the name configs use; a name is taken by a class (module + qualified name, so a
module reload may register again); third-party packages add families through the entry-point group
``harness.probes`` (``toy = "my_pkg.probes:Toy"``), loaded on the first lookup.

Metric names are unique across families, and a metric may not be named like another family (a
config entry names either a family or a metric). ``METRICS`` is a live read-only view of every
registered metric, families in registration order (built-ins first), metrics in declaration order.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from harness.probes.base import NAME_RE, MetricInfo, ProbeFamily

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.probes"

_REGISTRY: dict[str, type[ProbeFamily]] = {}
_ENTRY_POINTS_LOADED = False


def _same_class(a: type, b: Any) -> bool:
    """Same module and qualified name: the same class, possibly re-created by a module reload."""
    return (a.__module__, a.__qualname__) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _check_metrics(name: str, cls: type[ProbeFamily]) -> None:
    """Refuse a family whose metric declarations clash with themselves or with other families."""
    infos = cls.METRICS
    if not infos or not all(isinstance(i, MetricInfo) for i in infos):
        raise TypeError(f"probe family {name!r}: METRICS must be a non-empty tuple of MetricInfo, got {infos!r}")
    names = [i.name for i in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"probe family {name!r} declares a metric twice: {names}")
    for info in infos:
        bad = [i for i in info.inputs if i not in names or not cls.declared()[i].per_case]
        if bad:
            raise ValueError(f"probe family {name!r}: aggregate {info.name!r} has inputs {bad} that are not "
                             f"per-case metrics of the family")
    for other_name, other in _REGISTRY.items():
        if other_name == name:
            continue
        clash = sorted(set(names) & (set(other.declared()) | {other_name}))
        if clash:
            raise ValueError(f"probe family {name!r}: metric name(s) {clash} already taken by family {other_name!r}")
        if name in other.declared():
            raise ValueError(f"probe family name {name!r} is a metric of family {other_name!r}")


def register_probe(name: str):
    """Class decorator: register a ``ProbeFamily`` under a lowercase snake name.

    Raises:
        ValueError: a malformed name, a name taken by another class (a class is the same when its
            module and qualified name are: re-registering after a reload is allowed), or metric
            names that clash with another family's.
        TypeError: not a ``ProbeFamily`` subclass, or malformed ``METRICS``.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"probe family name {name!r} must be lowercase snake case ([a-z][a-z0-9_]*)")

    def deco(cls: type[ProbeFamily]) -> type[ProbeFamily]:
        if not (isinstance(cls, type) and issubclass(cls, ProbeFamily)):
            raise TypeError(f"@register_probe({name!r}) needs a ProbeFamily subclass, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and not _same_class(old, cls):
            raise ValueError(f"probe family name {name!r} is already registered to {old.__module__}."
                             f"{old.__qualname__}; cannot register {cls.__module__}.{cls.__qualname__} under it")
        _check_metrics(name, cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            old = _REGISTRY.get(ep.name)
            if old is None:
                register_probe(ep.name)(cls)
            elif not _same_class(old, cls):
                log.error("probe plugin %s = %s not loaded: the name is already registered to %s.%s",
                          ep.name, ep.value, old.__module__, old.__qualname__)
        except Exception as exc:  # a broken plugin must not hide the built-in probes
            log.error("could not load probe plugin %s = %s: %s", ep.name, ep.value, exc)


def available() -> list[str]:
    """Names of all registered probe families (built-in and entry-point plugins), in registration order."""
    _load_entry_points()
    return list(_REGISTRY)


def get_probe(name: str) -> type[ProbeFamily]:
    """The family class registered under ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"unknown probe family {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def family_of(metric: str) -> str | None:
    """The name of the family declaring ``metric``, or None."""
    _load_entry_points()
    return next((n for n, cls in _REGISTRY.items() if metric in cls.declared()), None)


class _Metrics(Mapping[str, MetricInfo]):
    """Read-only view: metric name -> ``MetricInfo`` of every registered family, always current."""

    def _table(self) -> dict[str, MetricInfo]:
        _load_entry_points()
        return {name: info for cls in _REGISTRY.values() for name, info in cls.declared().items()}

    def __getitem__(self, name: str) -> MetricInfo:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"METRICS({list(self)})"


METRICS: Mapping[str, MetricInfo] = _Metrics()
