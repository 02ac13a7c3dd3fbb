"""``python -m harness.inspect``: a state_dict inspector that knows which weights an edit would touch.

    python -m harness.inspect model=tiny algorithm=direct             # any model source the config can load
    python -m harness.inspect algorithm=rome --targets-only --csv inspect.csv
    python -m harness.inspect model.weights=finetuned.safetensors     # a base model with a state_dict overlaid
    python -m harness.inspect path/to/state_dict.pt                   # a bare state_dict file (weights-only)

Composes the same config as ``python -m harness`` (no run directory), loads the model
(``harness.models.load_configured``, so ``model.weights`` overlays apply), builds the configured
algorithm and asks it for ``targets(model, [first data request])``. Lists every parameter and
buffer: shape, dtype, device, number of elements, bytes, trainable (a parameter: what an optimizer
could update; the harness loads models with gradients off, so ``requires_grad`` says nothing),
whether the algorithm targets it (``*``) and the snapshot bytes the Editor would spend on it; tied
tensors are listed under every name and counted once. Then per-layer totals and a summary line.
``--csv PATH`` writes the tensor table to PATH and the layer totals to ``PATH`` with ``.layers.csv``.

A bare state_dict file (``.safetensors``; ``.pt``/``.pth``/``.bin`` through
``torch.load(weights_only=True)``) is listed without a model: no targets, no trainable flag.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.results import format_table, write_csv
from harness.weights import WeightsError, is_weights_file, read_state_dict

COLUMNS = ["name", "kind", "shape", "dtype", "device", "numel", "bytes", "trainable", "target", "snapshot_bytes",
           "tied_to"]
LAYER_COLUMNS = ["group", "tensors", "numel", "bytes", "targets", "snapshot_bytes"]
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # the prefix up to the first numeric component: model.layers.3


def human(n: int) -> str:
    """Bytes in a short human-readable form."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def layer_of(name: str) -> str:
    """The group a tensor is totalled under: its block (``model.layers.3``) or else its module (``lm_head``)."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def _rows(named: Iterable[tuple[str, torch.Tensor, str, bool | None]], targets: set[str] | None) -> list[dict]:
    """One row per (name, tensor, kind, trainable); tensors sharing storage with an earlier name are ``tied_to`` it."""
    rows, first = [], {}
    for name, t, kind, trainable in named:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        tied = first.setdefault(key, name) if t.numel() else name  # empty tensors share null pointers
        nbytes = t.numel() * t.element_size()
        hit = None if targets is None else name in targets
        rows.append({"name": name, "kind": kind, "shape": "x".join(map(str, t.shape)) or "()",
                     "dtype": str(t.dtype).removeprefix("torch."), "device": str(t.device), "numel": t.numel(),
                     "bytes": nbytes, "trainable": trainable, "target": hit,
                     "snapshot_bytes": nbytes if hit and tied == name else 0, "tied_to": tied if tied != name else ""})
    return rows


def model_rows(model: nn.Module, targets: set[str] | None = None) -> list[dict]:
    """Every parameter and buffer of ``model`` (tied names included), marked against ``targets``.

    Buffers the model does not save (``persistent=False``) are listed as ``buffer (not saved)``.
    """
    saved = set(model.state_dict(keep_vars=True))
    named = [(n, p.detach(), "parameter", True) for n, p in model.named_parameters(remove_duplicate=False)]
    named += [(n, b, "buffer" if n in saved else "buffer (not saved)", False)
              for n, b in model.named_buffers(remove_duplicate=False)]
    return _rows(named, targets)


def state_dict_rows(state: Mapping[str, torch.Tensor]) -> list[dict]:
    """The tensors of a bare state_dict (no model: no trainable flag, no targets)."""
    return _rows(((n, t, "tensor", None) for n, t in state.items()), None)


def layer_totals(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per-group totals (``layer_of``) in first-seen order; tied names are not counted twice."""
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(layer_of(r["name"]), {"group": layer_of(r["name"]), "tensors": 0, "numel": 0, "bytes": 0,
                                                   "targets": 0, "snapshot_bytes": 0})
        if r["tied_to"]:
            continue
        g["tensors"] += 1
        g["numel"] += r["numel"]
        g["bytes"] += r["bytes"]
        g["targets"] += bool(r["target"])
        g["snapshot_bytes"] += r["snapshot_bytes"]
    return list(out.values())


def write_tables(path: str | Path, rows: Sequence[Mapping[str, Any]], totals: Sequence[Mapping[str, Any]]) -> Path:
    """Write the tensor rows to ``path`` and the layer totals beside it (``<stem>.layers.csv``); returns the latter."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_csv(p, COLUMNS, rows)
    layers = p.with_name(p.stem + ".layers.csv")
    write_csv(layers, LAYER_COLUMNS, totals)
    return layers


def _print(rows: list[dict], only_targets: bool) -> list[dict]:
    shown = [r for r in rows if r["target"] or not only_targets]
    table = [{**r, "": "*" if r["target"] else "", "trainable": "" if r["trainable"] is None else r["trainable"],
              "bytes": human(r["bytes"]), "snapshot_bytes": human(r["snapshot_bytes"]) if r["snapshot_bytes"] else ""}
             for r in shown]
    print(format_table(table, ["", *COLUMNS]))
    totals = layer_totals(rows)
    print("\nper layer:")
    print(format_table([{**t, "bytes": human(t["bytes"]), "snapshot_bytes": human(t["snapshot_bytes"])}
                        for t in totals], LAYER_COLUMNS))
    return totals


def _split(args: list[str]) -> tuple[list[str], bool, str | None]:
    only_targets = "--targets-only" in args
    csv_path = None
    rest = []
    it = iter(a for a in args if a != "--targets-only")
    for a in it:
        if a == "--csv":
            csv_path = next(it, None)
            if csv_path is None:
                raise SystemExit("--csv needs a path")
        elif a.startswith("--csv="):
            csv_path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, only_targets, csv_path


def inspect_file(path: str | Path, csv_path: str | None = None) -> int:
    """Print (and optionally write) the tensors of a bare state_dict file; returns the exit status."""
    rows = state_dict_rows(read_state_dict(path))
    totals = _print(rows, only_targets=False)
    unique = [r for r in rows if not r["tied_to"]]
    print(f"\nstate_dict {path}: {len(unique)} tensor(s), {sum(r['numel'] for r in unique):,} elements, "
          f"{human(sum(r['bytes'] for r in unique))} (no model: targets unknown)")
    if csv_path:
        print(f"tables: {csv_path}  {write_tables(csv_path, rows, totals)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; ``argv`` are Hydra overrides (or one weights file) plus the options above."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    overrides, only_targets, csv_path = _split(args)
    try:
        if len(overrides) == 1 and "=" not in overrides[0]:
            return inspect_file(overrides[0], csv_path)
        return inspect_model(overrides, only_targets, csv_path)
    except (WeightsError, FileNotFoundError) as exc:
        print(f"inspect failed: {exc}", file=sys.stderr)
        return 1


def inspect_model(overrides: list[str], only_targets: bool = False, csv_path: str | None = None) -> int:
    """Print (and optionally write) the tensors of the configured model, marked against the algorithm's targets."""

    from harness.algorithms import get_algorithm
    from harness.cli import compose_config, to_config
    from harness.config import validate
    from harness.data import load_requests
    from harness.models import load_configured

    cfg = to_config(compose_config(overrides))
    if is_weights_file(cfg.model.source):
        return inspect_file(cfg.model.source, csv_path)
    algorithm = get_algorithm(cfg.algorithm.name)(validate(cfg))
    model, tok = load_configured(cfg.model, device=cfg.device, dtype=cfg.dtype)
    d = cfg.data
    requests = load_requests(d.kind, d.path, limit=1, offset=d.offset, skip_invalid=d.skip_invalid).requests
    if not requests:
        print("the data gave no request", file=sys.stderr)
        return 1
    request = requests[0]
    targets = set(algorithm.targets(model, [request]))
    rows = model_rows(model, targets)
    totals = _print(rows, only_targets)
    unique = [r for r in rows if not r["tied_to"]]
    n_params = sum(r["numel"] for r in unique if r["kind"] == "parameter")
    print(f"\nmodel {cfg.model.name or cfg.model.source}: {n_params:,} parameters, "
          f"{human(sum(r['bytes'] for r in unique))}; algorithm {cfg.algorithm.name}: {len(targets)} target(s) "
          f"for case {request.case_id!r} ({request.rewrite_prompt!r} -> {request.target_new!r}); "
          f"snapshot {human(sum(r['snapshot_bytes'] for r in rows))}")
    if csv_path:
        print(f"tables: {csv_path}  {write_tables(csv_path, rows, totals)}")
    unknown = sorted(targets - {n for n, _ in model.named_parameters()})
    if unknown:
        print(f"declared targets that are not parameters: {unknown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
