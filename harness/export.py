"""``python -m harness.export``: write a model as it stands after a run, as HF safetensors, ONNX or a state_dict.

    python -m harness.export RUN_DIR --format hf --out exported/hf
    python -m harness.export RUN_DIR --format onnx --out exported/onnx          # + onnxruntime parity check
    python -m harness.export RUN_DIR/checkpoint --format state_dict --out exported/sd
    python -m harness.export RUN_DIR --base --format onnx --out exported/base   # the unedited model

SOURCE is a run directory (its ``run.json`` says which model), a checkpoint directory of a
sequential run, or a delta file (``save_delta``). The base model is loaded as the run loaded it
(``harness.models.load_configured``, including a ``model.weights`` overlay), the delta is put on with
``harness.editor.apply_delta`` (which refuses a delta made from another base), and the result is
written into ``--out`` atomically (built beside it, renamed into place; an existing non-empty
``--out`` needs ``--overwrite``). In a run directory the final ``delta.safetensors`` (``save_model=true``)
wins over ``checkpoint/`` (a sequential run's last retention point).

Formats:
  * ``hf``: ``save_pretrained`` safetensors + tokenizer, read back and compared bit for bit;
  * ``state_dict``: ``state_dict.safetensors`` (``harness.weights.save_state_dict``), which
    ``model.weights=<file>`` overlays onto the base model, exactly;
  * ``onnx``: ``model.onnx`` (float32 logits from input ids and attention mask, dynamic batch and
    sequence axes) + tokenizer, checked with onnxruntime against PyTorch on the run's own probe
    prompts (``harness.onnx_export``); the export fails (exit 1, nothing written) when the max
    absolute logit difference exceeds ``--atol`` or the argmax agreement is below ``--min-agreement``.

Every export writes ``export.json``: source, delta tensors, weights digest, files and sizes, timing
and (ONNX) the parity figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from harness.config import ModelConfig
from harness.editor import apply_delta
from harness.safefiles import MEMORY_FORMAT, memory_path, read_checked
from harness.models import load_configured, resolve_dtype
from harness.onnx_export import DEFAULT_ATOL, DEFAULT_OPSET, MissingDependencyError, Parity, ParityError
from harness.results import read_json, read_rows
from harness.snapshot import SnapshotError, bit_equal, model_digest
from harness.weights import WeightsError, alias_groups, save_state_dict

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx", "state_dict")
DELTA = "delta.safetensors"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ExportError(RuntimeError):
    """The source cannot be resolved, or the written files do not reproduce the model."""


@dataclass(frozen=True)
class RunSource:
    """What to export: the run whose ``run.json`` gives the model, and the delta to put on (None: base)."""

    run_dir: Path
    config: dict[str, Any]
    delta: Path | None


@dataclass
class ExportResult:
    """What an export wrote. ``files`` maps file names (relative to ``out``) to bytes."""

    out: Path
    format: str
    files: dict[str, int]
    seconds: float
    delta_tensors: list[str] = field(default_factory=list)
    digest: str = ""
    parity: Parity | None = None


# ----------------------------------------------------------------------------------------------
# source -> model


def _find_run_json(start: Path) -> Path:
    for d in [start, *start.parents][:3]:
        if (d / "run.json").is_file():
            return d
    raise ExportError(f"no run.json in {start} or its two parent directories; give the run directory with --run")


def resolve_source(source: str | Path, run_dir: str | Path | None = None, base: bool = False) -> RunSource:
    """Find the run config and the delta of ``source`` (run dir, checkpoint dir or delta file).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ExportError: no ``run.json`` found, or a run directory without any delta and ``base`` unset.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"export source {str(src)!r} does not exist")
    if src.is_file():
        delta: Path | None = src
    elif (src / "run.json").is_file():
        found = [p for p in (src / DELTA, src / "checkpoint" / DELTA, src / "checkpoint.old" / DELTA) if p.is_file()]
        delta = found[0] if found else None
    elif (src / DELTA).is_file():
        delta = src / DELTA
    else:
        raise ExportError(f"{src} is neither a run directory (run.json), a checkpoint directory ({DELTA}) "
                          "nor a delta file")
    rd = Path(run_dir).expanduser() if run_dir else _find_run_json(src if src.is_dir() else src.parent)
    conf = read_json(rd / "run.json")
    if conf is None:
        raise ExportError(f"{rd / 'run.json'} does not exist")
    if base:
        delta = None
    elif delta is None:
        raise ExportError(f"{src} holds no {DELTA} (run with save_model=true, or a sequential run's checkpoint/); "
                          "pass --base to export the unedited model of this run")
    return RunSource(rd, conf["config"], delta)


def _delta_dtype(path: Path) -> torch.dtype | None:
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            return _ST_DTYPES.get(f.get_slice(key).get_dtype())
    return None


def _refuse_memory(delta: Path) -> None:
    """Raise ``ExportError`` when a non-empty algorithm memory lies beside ``delta`` (see ``save_delta``)."""
    for side in (memory_path(delta), delta.parent / "memory.safetensors"):
        if not side.exists():
            continue
        f = read_checked(side, MEMORY_FORMAT)
        if f.tensors or f.metadata.get("structure", "{}") != "{}":
            raise ExportError(f"{side}: the edit holds {f.metadata.get('algorithm')}'s memory (hooks, modules or "
                              "a prompt context), which an exported weights file cannot carry; load it with "
                              "Editor.apply_delta instead")


def load_source(src: RunSource, device: str = "cpu") -> tuple[torch.nn.Module, Any, list[str]]:
    """The run's base model (its dtype: the config's, else the delta's) with the delta put on.

    Returns:
        (model, tokenizer, names the delta wrote).

    Raises:
        SnapshotError: the delta does not fit this base model (``apply_delta``).
        ExportError: the edit holds memory (GRACE's codebook, IKE's context), which no weights format carries.
    """
    conf = src.config
    if src.delta is not None:
        _refuse_memory(src.delta)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg = ModelConfig(**{k: v for k, v in conf["model"].items() if k in known})
    dtype: Any = conf.get("dtype", "auto")
    if dtype == "auto" and src.delta is not None:
        dtype = _delta_dtype(src.delta) or resolve_dtype("auto", torch.device(device))
    model, tok = load_configured(mcfg, device=device, dtype=dtype)
    names = apply_delta(model, src.delta) if src.delta is not None else []
    log.info("%s: base %s%s", src.run_dir, mcfg.name or mcfg.source,
             f" + {len(names)} tensor(s) from {src.delta}" if src.delta else " (no delta)")
    return model, tok, names


def probe_prompts(src: RunSource, max_prompts: int = 32) -> list[str]:
    """The run's probe prompts: rewrite, paraphrase and neighborhood prompts of its cases, deduplicated.

    Read from the run's data config (``harness.data.load_requests``), restricted to the case ids in
    ``cases.csv`` when present.
    """
    rows = read_rows(src.run_dir / "cases.csv") if (src.run_dir / "cases.csv").is_file() else []
    from harness.data import load_requests

    d = src.config["data"]
    requests = list(load_requests(d["kind"], d.get("path"), offset=d.get("offset", 0),
                                  skip_invalid=d.get("skip_invalid", False)).requests)
    ids = {r["case_id"] for r in rows}
    if ids:
        requests = [r for r in requests if r.case_id in ids]
    prompts = [r.rewrite_prompt for r in requests]
    prompts += [p for r in requests for p in r.paraphrase_prompts]
    prompts += [qa.prompt for r in requests for qa in r.neighborhood]
    return list(dict.fromkeys(prompts))[:max_prompts]


# ----------------------------------------------------------------------------------------------
# model -> files


def _verify_hf(model: torch.nn.Module, directory: Path) -> None:
    """Every tensor of the saved safetensors files equals the model's, and every model tensor is saved."""
    state = model.state_dict()
    aliases = alias_groups(model)
    seen: set[str] = set()
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key not in state:
                    raise ExportError(f"{shard}: holds {key!r}, which is not in the model's state_dict")
                if not bit_equal(state[key].cpu(), f.get_tensor(key)):
                    raise ExportError(f"{shard}: {key!r} differs from the model")
                seen.add(key)
    for first, names in aliases.items():
        if seen & {first, *names}:
            seen |= {first, *names}
    unsaved = sorted(set(state) - seen)
    if unsaved:
        raise ExportError(f"{directory}: not saved: {unsaved}")


def _write(model: torch.nn.Module, tok: Any, fmt: str, tmp: Path, prompts: Sequence[str], atol: float,
           min_agreement: float, opset: int, optimize: bool) -> tuple[Parity | None, dict[str, Any]]:
    """Write ``fmt`` into ``tmp``; return the parity figures (ONNX) and manifest entries."""
    if fmt == "hf":
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _verify_hf(model, tmp)
        return None, {}
    if fmt == "state_dict":
        save_state_dict(model, tmp / "state_dict.safetensors")
        return None, {}
    from harness.onnx_export import check_parity, export_graph, require_onnx

    require_onnx()
    if not prompts:
        raise ExportError("the ONNX parity check needs prompts; the run gave none")
    model.to(device="cpu", dtype=torch.float32)  # exact from bf16/fp16; ORT's CPU kernels are float32
    seconds = export_graph(model, tok, tmp / "model.onnx", prompts, opset=opset, optimize=optimize)
    tok.save_pretrained(tmp)
    parity = check_parity(model, tok, tmp / "model.onnx", prompts, atol=atol, min_agreement=min_agreement)
    return parity, {"opset": opset, "optimized": optimize, "graph_seconds": round(seconds, 3)}


def _check_out(fmt: str, out: str | Path, overwrite: bool) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {list(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    return out


def export_model(model: torch.nn.Module, tok: Any, fmt: str, out: str | Path, *, prompts: Sequence[str] = (),
                 atol: float = DEFAULT_ATOL, min_agreement: float = 1.0, opset: int = DEFAULT_OPSET,
                 optimize: bool = True, overwrite: bool = False,
                 manifest: dict[str, Any] | None = None) -> ExportResult:
    """Write ``model`` (+ tokenizer) into ``out`` in format ``fmt``, atomically, with ``export.json``.

    Args:
        fmt: ``hf``, ``onnx`` or ``state_dict``.
        prompts: the ONNX parity prompts (required for ``onnx``).
        atol, min_agreement, opset, optimize: ONNX bounds, opset and graph optimizer (see
            ``harness.onnx_export``).
        overwrite: replace a non-empty ``out``.
        manifest: extra entries for ``export.json`` (where the model came from).

    Returns:
        An ``ExportResult``.

    Raises:
        ValueError: unknown format. ExportError: ``out`` is not empty (without ``overwrite``) or a
        saved file does not reproduce the model. ParityError, MissingDependencyError: ONNX only.
        Nothing is left at ``out`` when any of these is raised.
    """
    out = _check_out(fmt, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would become the output directory's mode
    try:
        t0 = time.perf_counter()
        digest = model_digest(model)
        try:
            parity, extra = _write(model, tok, fmt, tmp, prompts, atol, min_agreement, opset, optimize)
        except ParityError as exc:
            raise ParityError(f"{out} not written: the exported graph disagrees with PyTorch: "
                              f"{exc.parity.summary()}", exc.parity) from None
        seconds = time.perf_counter() - t0
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        info = {"format": fmt, **(manifest or {}), **extra, "weights_digest": digest, "seconds": round(seconds, 3),
                "files": files, "parity": parity.as_dict() if parity else None}
        (tmp / "export.json").write_text(json.dumps(info, indent=2, default=str))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %.1f MiB) in %.1fs", out, fmt, sum(files.values()) / 2**20, seconds)
    return ExportResult(out, fmt, files, seconds, digest=digest, parity=parity)


def export_run(source: str | Path, fmt: str, out: str | Path, *, run_dir: str | Path | None = None,
               base: bool = False, device: str = "cpu", dtype: str | None = None, max_prompts: int = 32,
               atol: float = DEFAULT_ATOL, min_agreement: float = 1.0, opset: int = DEFAULT_OPSET,
               optimize: bool = True, overwrite: bool = False) -> ExportResult:
    """Export the model a run left (``resolve_source`` + ``load_source`` + ``export_model``).

    Args:
        source: a run directory, a checkpoint directory or a delta file.
        run_dir: the run whose ``run.json`` gives the model (default: found from ``source``).
        base: export the run's base model, without its delta.
        device: where to load the model.
        dtype: cast the edited model before writing (``hf``/``state_dict``; ONNX is always float32).
        max_prompts: at most this many of the run's probe prompts for the ONNX parity check.

    Raises:
        See ``resolve_source``, ``load_source`` and ``export_model``.
    """
    _check_out(fmt, out, overwrite)  # before minutes of loading
    if fmt == "onnx":
        from harness.onnx_export import require_onnx

        require_onnx()
    src = resolve_source(source, run_dir, base)
    model, tok, names = load_source(src, device=device)
    if dtype and fmt != "onnx":
        model.to(dtype=resolve_dtype(dtype, torch.device(device)))
    prompts = probe_prompts(src, max_prompts) if fmt == "onnx" else []
    manifest = {"source": str(source), "run_dir": str(src.run_dir), "delta": str(src.delta) if src.delta else None,
                "delta_tensors": names, "model": src.config["model"], "dtype": str(next(model.parameters()).dtype)}
    result = export_model(model, tok, fmt, out, prompts=prompts, atol=atol, min_agreement=min_agreement,
                          opset=opset, optimize=optimize, overwrite=overwrite, manifest=manifest)
    result.delta_tensors = names
    return result


# ----------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, checkpoint directory or delta file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--run", help="run directory whose run.json gives the model (default: found from SOURCE)")
    p.add_argument("--base", action="store_true", help="export the run's base model, without the delta")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="cast before writing (hf/state_dict): float32, bfloat16, float16")
    p.add_argument("--max-prompts", type=int, default=32, help="ONNX parity: at most this many probe prompts")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="ONNX parity: max absolute logit difference")
    p.add_argument("--min-agreement", type=float, default=1.0, help="ONNX parity: min argmax agreement")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-optimize", action="store_true",
                   help="skip onnxscript's graph optimizer (export ~2.5x faster, logits a bit further from PyTorch's)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, help="torch/onnxruntime CPU threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on any export failure, with the reason)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("harness", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = export_run(args.source, args.format, args.out, run_dir=args.run, base=args.base, device=args.device,
                         dtype=args.dtype, max_prompts=args.max_prompts, atol=args.atol,
                         min_agreement=args.min_agreement, opset=args.opset, optimize=not args.no_optimize,
                         overwrite=args.overwrite)
    except (ExportError, ParityError, MissingDependencyError, SnapshotError, WeightsError, FileNotFoundError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    size = sum(res.files.values())
    print(f"{res.format} export of {args.source} -> {res.out}: {len(res.files)} file(s), {size / 2**20:.1f} MiB, "
          f"{res.seconds:.1f}s, {len(res.delta_tensors)} edited tensor(s)")
    if res.parity is not None:
        print(f"ONNX parity ({res.parity.seconds:.1f}s): {res.parity.summary()}")
        for p in res.parity.predictions[:5]:
            print(f"  {p['prompt']!r} -> torch {p['torch']!r}, onnx {p['onnx']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
