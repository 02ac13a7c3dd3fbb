"""Hyperparameter dataclasses built from mappings: ``make_hparams`` and nested blocks.

An algorithm's ``Hparams`` is a dataclass whose defaults are the defaults. Blocks that several
algorithms share are nested dataclasses (``target: TargetHparams``, ``stats: StatsConfig``,
``templates: TemplateHparams``); a mapping given for a block is merged onto the field's own default
block, so ``{"stats": {"seed": 1}}`` keeps MEMIT's ``n_samples=256`` rather than ``StatsConfig``'s.
Unknown keys are refused with their full dotted path (``target.lrr``), at any depth.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


def make_hparams(cls: type, values: Mapping[str, Any], where: str = "hparams", base: Any = None) -> Any:
    """Build the hyperparameter dataclass ``cls`` from a mapping, nested blocks included.

    A field typed as a dataclass (a block such as ``target: TargetHparams``) takes a mapping that is
    merged onto that field's default: ``{"target": {"lr": 0.1}}`` changes ``lr`` and keeps the rest
    of the class's own default block (which may differ from the block class's defaults). A field
    typed as a list of dataclasses takes a list of mappings. Instances are taken as they are.

    Args:
        cls: the dataclass.
        values: field values by name; nested mappings for blocks.
        where: what the values configure, for error messages (``"algorithm 'rome'"``).
        base: an instance of ``cls`` whose values replace the defaults (``values`` override it).

    Returns:
        The ``cls`` instance (its ``__post_init__`` and those of its blocks have run).

    Raises:
        TypeError: ``cls`` is not a dataclass; an unknown key, named by its full dotted path
            (``target.lrr``) with the known keys of its block; a block given as a non-mapping.
        ValueError: a value the dataclasses' own checks refuse.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{where}: Hparams must be a dataclass, got {cls!r}")
    return _build(cls, values, where, "", base)


def _build(cls: type, values: Any, where: str, path: str, base: Any) -> Any:
    """``cls`` from ``values`` merged onto ``base`` (or the field defaults); ``path`` is the block's
    dotted prefix (``""`` or ``"target."``)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{where}: {path.rstrip('.') or 'hparams'} must be a mapping of {cls.__name__} fields, "
                        f"got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        block = f" of {path.rstrip('.')}" if path else ""
        raise TypeError(f"{where}: unknown hyperparameter(s) {[path + str(k) for k in unknown]}; "
                        f"known keys{block}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: copy.deepcopy(getattr(base, name)) for name in fields} if base is not None else {}
    for name, value in values.items():
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        kwargs[name] = _convert(hints[name], value, where, path + name, default)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _convert(hint: Any, value: Any, where: str, path: str, default: Any) -> Any:
    """``value`` for a field typed ``hint``: blocks (and lists of blocks) built from mappings."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or len(args) != 1:
            return value
        hint = args[0]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, value, where, path + ".", default if isinstance(default, hint) else None)
    elem = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
    if dataclasses.is_dataclass(elem) and isinstance(value, (list, tuple)):
        return [v if isinstance(v, elem) else _build(elem, v, where, f"{path}.{i}.", None) for i, v in enumerate(value)]
    return value


def build_blocks(hparams: Any) -> None:
    """Turn mappings given for block fields of a hyperparameter dataclass into blocks, in place.

    Call at the start of ``__post_init__`` so that ``RomeHparams(target={"lr": 0.1})`` works like
    ``make_hparams``: the mapping is merged onto the field's default block.

    Raises:
        TypeError: as ``make_hparams``.
    """
    hints = typing.get_type_hints(type(hparams))
    for f in dataclasses.fields(hparams):
        value = getattr(hparams, f.name)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(hints[f.name]):
            setattr(hparams, f.name, _convert(hints[f.name], value, type(hparams).__name__, f.name, _field_default(f)))
