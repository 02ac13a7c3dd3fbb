"""``python -m harness.inspect [--targets-only] [OVERRIDES...]``: which weights would an edit touch?

Composes the same config as ``python -m harness`` (no run directory), loads the model, builds the
configured algorithm and asks it for ``targets(model, [first data request])``. Prints every
parameter (name, shape, dtype, trainable, size), marks the targets with ``*``, and ends with the
totals and the size of the snapshot the Editor would take.

    python -m harness.inspect model=tiny algorithm=direct
    python -m harness.inspect algorithm=rome --targets-only
"""
from __future__ import annotations

import sys

from harness.algorithms import get_algorithm
from harness.cli import compose_config, to_config
from harness.config import validate
from harness.models import load_model
from harness.results import format_table


def human(n: int) -> str:
    """Bytes in a short human-readable form."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; ``argv`` are Hydra overrides plus ``--targets-only``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    only_targets = "--targets-only" in args
    cfg = to_config(compose_config([a for a in args if a != "--targets-only"]))
    algorithm = get_algorithm(cfg.algorithm.name)(validate(cfg))
    model, tok = load_model(cfg.model.source, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.model.cache_dir,
                            trust_remote_code=cfg.model.trust_remote_code, spec=cfg.model.spec, tiny=cfg.model.tiny)
    from harness.data import load_requests

    d = cfg.data
    requests = load_requests(d.kind, d.path, limit=1, offset=d.offset, skip_invalid=d.skip_invalid).requests
    if not requests:
        print("the data gave no request", file=sys.stderr)
        return 1
    request = requests[0]
    targets = set(algorithm.targets(model, [request]))
    rows, total, snap = [], 0, 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        total += nbytes
        hit = name in targets
        snap += nbytes if hit else 0
        if hit or not only_targets:
            rows.append({"": "*" if hit else "", "name": name, "shape": "x".join(map(str, p.shape)) or "()",
                         "dtype": str(p.dtype).removeprefix("torch."), "trainable": p.requires_grad,
                         "size": human(nbytes)})
    print(format_table(rows, ["", "name", "shape", "dtype", "trainable", "size"]))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel {cfg.model.name or cfg.model.source}: {n_params:,} parameters, {human(total)}; "
          f"algorithm {cfg.algorithm.name}: {len(targets)} target(s) for case {request.case_id!r} "
          f"({request.rewrite_prompt!r} -> {request.target_new!r}); snapshot {human(snap)}")
    unknown = sorted(targets - {n for n, _ in model.named_parameters()})
    if unknown:
        print(f"declared targets that are not parameters: {unknown}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
