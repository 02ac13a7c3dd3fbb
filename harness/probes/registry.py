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

from harness.probes.base import MetricInfo, ProbeFamily
from harness.registry import Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "harness.probes"

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
    for other_name, other in PROBES.classes.items():
        if other_name == name:
            continue
        clash = sorted(set(names) & (set(other.declared()) | {other_name}))
        if clash:
            raise ValueError(f"probe family {name!r}: metric name(s) {clash} already taken by family {other_name!r}")
        if name in other.declared():
            raise ValueError(f"probe family name {name!r} is a metric of family {other_name!r}")


PROBES: Registry[type[ProbeFamily]] = Registry("probe family", ProbeFamily, ENTRY_POINT_GROUP, "register_probe",
                                               check=_check_metrics)

#: Class decorator: register a ``ProbeFamily`` under a lowercase snake name; its metric names must be
#: unique across families and differ from every family's name (``harness.registry``).
register_probe = PROBES.register


def available() -> list[str]:
    """Names of all registered probe families (built-in and entry-point plugins), in registration order."""
    return PROBES.names()


def get_probe(name: str) -> type[ProbeFamily]:
    """The family class registered under ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    return PROBES.get(name)


def family_of(metric: str) -> str | None:
    """The name of the family declaring ``metric``, or None."""
    return next((n for n, cls in PROBES if metric in cls.declared()), None)


class _Metrics(Mapping[str, MetricInfo]):
    """Read-only view: metric name -> ``MetricInfo`` of every registered family, always current."""

    def _table(self) -> dict[str, MetricInfo]:
        return {name: info for _, cls in PROBES for name, info in cls.declared().items()}

    def __getitem__(self, name: str) -> MetricInfo:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"METRICS({list(self)})"


METRICS: Mapping[str, MetricInfo] = _Metrics()
