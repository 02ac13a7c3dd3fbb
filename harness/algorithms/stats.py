"""Second-moment statistics of MLP keys, C = E[k kᵀ], for ROME, MEMIT and AlphaEdit
(docs/algorithms/key-statistics.md).

``k`` is the input of the MLP output projection (``spec.mlp_out``) at one layer; C is uncentered,
accumulated over every non-pad token of a corpus and divided by the token count (as ROME's
``layer_stats``). The corpus is text sampled from the model itself (``source="model"``: a fixed
seed, so the same model gives the same text; not comparable to the papers, and a warning says so),
a local ``.txt``/``.jsonl`` file sampled with ``seed``, or the anchors' precomputed ``.npz``
statistics (corpus.py). ``StatsCache.describe`` gives the provenance for reports. Gupta et al. ("Efficient Knowledge Editing via
Minimal Precomputation") show far fewer than the anchors' 44M vectors suffice; a ridge (applied
only when solving, ``inverse_apply``) keeps C invertible.

Caching: on disk as safetensors under ``cache_dir`` keyed by the model's weights digest
(``snapshot.model_digest``), the module, the source (+ the file's digest), ``n_samples``,
``seq_len``, ``seed`` and ``dtype``; in memory per algorithm instance through a ``StatsCache``
(no module-level caches). C must come from the unedited model: an algorithm asks for it before its
first edit and keeps it in its ``StatsCache``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from harness.algorithms.corpus import file_digest, load_npz, npz_path, provenance, read_corpus, sample_texts, source_kind
from harness.algorithms.hooks import Hooks, StopForward, first_input, model_device, run_to_stop
from harness.models import ModelSpec, default_cache_dir, get_module
from harness.snapshot import model_digest
from harness.tokens import pad_batch, pad_id

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
__all__ = ["StatsConfig", "StatsCache", "corpus", "read_corpus", "sample_texts", "second_moments", "stats_path"]


#: Documents the anchors' statistics rest on (ROME/MEMIT/AlphaEdit ``mom2_n_samples``); a corpus file
#: given with fewer is used as asked, with a warning (sizes are never switched behind the user's back).
ANCHOR_SAMPLES = 100_000


@dataclass(frozen=True)
class StatsConfig:
    """Where C comes from and how it is accumulated.

    Attributes:
        source: ``"model"`` (text sampled from the model, top-k 50, fixed ``seed``), the path of a
            local ``.txt`` / ``.jsonl`` (field ``"text"``) corpus sampled with ``seed``, or of the
            anchors' ``layer_stats`` ``.npz`` (``{layer}`` / ``{module}`` filled in per layer; the
            sizes below are then ignored).
        n_samples: number of sequences (documents or chunks), each of at most ``seq_len`` tokens;
            so at most ``n_samples * seq_len`` keys per layer.
        seq_len: tokens per sequence.
        batch_size: sequences per forward pass.
        dtype: accumulation and storage dtype, ``"float32"`` or ``"float64"``.
        ridge: relative ridge for solves: ``C + ridge * mean(diag C) * I`` (``inverse_apply``).
        seed: sampling seed (model text; documents or chunks of a corpus file).
        cache_dir: on-disk cache; None means ``harness.models.default_cache_dir() / "stats"``.
    """

    source: str = "model"
    n_samples: int = 1000
    seq_len: int = 128
    batch_size: int = 16
    dtype: str = "float32"
    ridge: float = 1e-3
    seed: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"stats dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.n_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("n_samples and batch_size must be >= 1, seq_len >= 2")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        source_kind(self.source)  # raises on an unknown file type

    @property
    def root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "stats"


# ----------------------------------------------------------------------------------------------
# accumulation and disk cache


def corpus(model: nn.Module, tok: Any, cfg: StatsConfig) -> list[list[int]]:
    """The token sequences ``cfg`` describes (sampled from ``model`` or drawn from the file)."""
    if cfg.source == "model":
        return sample_texts(model, tok, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.batch_size)
    return read_corpus(tok, cfg.source, cfg.n_samples, cfg.seq_len, cfg.seed)


def stats_path(cfg: StatsConfig, digest: str, module: str) -> Path:
    """The cache file of C for ``module`` of the model with weights ``digest`` under ``cfg``."""
    if cfg.source == "model":
        src = f"model-seed{cfg.seed}"
    else:
        path = Path(cfg.source).expanduser()
        src = f"{path.stem}-{file_digest(path)}-seed{cfg.seed}"
    return cfg.root / digest / src / f"{module}.mom2.{cfg.n_samples}x{cfg.seq_len}.{cfg.dtype}.safetensors"


@torch.no_grad()
def accumulate(model: nn.Module, tok: Any, modules: Sequence[str], seqs: Sequence[Sequence[int]],
               dtype: torch.dtype, batch_size: int = 16) -> tuple[dict[str, torch.Tensor], int]:
    """Σ k kᵀ of the inputs of each module over the non-pad tokens of ``seqs`` (one pass for all).

    Returns:
        (sums by module name, in ``dtype`` on the CPU; the token count).
    """
    dev = model_device(model)
    pad = pad_id(tok)
    sums: dict[str, torch.Tensor] = {}
    mask = torch.zeros(0, dtype=torch.bool)  # the running batch's non-pad tokens (set before each forward)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: less padding

    def hook(name: str, last: bool) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        def pre(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = first_input(args, kwargs)
            x = x[mask.to(x.device)].to(dtype)
            sums[name] = sums.get(name, 0) + x.T @ x  # on the module's device; moved once, at the end
            if last:  # the deepest module needed: the layers above are not run
                raise StopForward
        return pre

    count = 0
    with Hooks() as hooks:
        for j, name in enumerate(modules):
            hooks.input(get_module(model, name), hook(name, j == len(modules) - 1))
        for start in tqdm(range(0, len(order), batch_size), desc="second moment", leave=False):
            ids, attn = pad_batch([seqs[i] for i in order[start:start + batch_size]], pad)
            mask = attn.bool().to(dev)
            count += int(attn.sum())
            run_to_stop(model, input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
    return {name: total.cpu() for name, total in sums.items()}, count


def second_moments(model: nn.Module, tok: Any, spec: ModelSpec, layers: Sequence[int], cfg: StatsConfig,
                   digest: Optional[str] = None, record: Optional[dict[int, dict[str, Any]]] = None,
                   ) -> tuple[dict[int, torch.Tensor], list[int]]:
    """C = E[k kᵀ] at each layer: from the anchors' ``.npz``, the disk cache, or computed in one pass.

    Args:
        layers: layer indices; keys are the inputs of ``spec.mlp_out`` there.
        digest: the model's ``model_digest`` if already known (it costs one pass over the weights).
        record: if given, filled with each layer's provenance (``corpus.provenance``).

    Returns:
        (C by layer: [d_ff, d_ff] in ``cfg.dtype`` on the CPU; the layers that were computed, not loaded).

    Raises:
        ValueError: an ``.npz`` source without ``{layer}``/``{module}`` for several layers, or one
            whose statistics do not fit the module (``corpus.load_npz``).
    """
    record = {} if record is None else record
    if source_kind(cfg.source) == "npz":
        return _from_npz(model, spec, layers, cfg, record), []
    if cfg.source == "model":
        log.warning("stats.source=model: C comes from text sampled from the model itself, not the anchors' "
                    "Wikipedia; lambda/threshold effects and scores are not comparable to the papers")
    elif cfg.n_samples < ANCHOR_SAMPLES:
        log.warning("stats.source=%s: C from at most %d sequences of %d tokens, the anchors' from %d Wikipedia "
                    "documents of up to the model's context; set stats.n_samples and stats.seq_len to compare "
                    "with the papers (docs/algorithms/key-statistics.md)", cfg.source, cfg.n_samples,
                    cfg.seq_len, ANCHOR_SAMPLES)
    digest = digest or model_digest(model)
    out: dict[int, torch.Tensor] = {}
    paths = {layer: stats_path(cfg, digest, spec.mlp_out.format(layer)) for layer in layers}
    for layer, path in paths.items():
        if path.is_file():
            data = load_file(str(path))
            out[layer] = data["mom2"]
            n_seq = _metadata(path).get("n_sequences")
            record[layer] = provenance(cfg.source, int(n_seq) if n_seq else None, int(data["count"]))
            log.info("loaded C for layer %d from %s", layer, path)
    todo = sorted(set(layers) - set(out))
    if todo:
        t = time.perf_counter()
        seqs = corpus(model, tok, cfg)
        modules = [spec.mlp_out.format(layer) for layer in todo]
        sums, count = accumulate(model, tok, modules, seqs, _DTYPES[cfg.dtype], cfg.batch_size)
        meta = {k: str(v) for k, v in asdict(cfg).items() if k != "cache_dir"}
        for layer, module in zip(todo, modules):
            out[layer] = sums[module] / count
            save_atomic(paths[layer], {"mom2": out[layer].contiguous(), "count": torch.tensor(count)},
                         {**meta, "digest": digest, "module": module, "n_sequences": str(len(seqs))})
            record[layer] = provenance(cfg.source, len(seqs), count)
        log.info("computed C for layers %s from %d sequences, %d tokens (%s) in %.1fs", todo, len(seqs), count,
                 cfg.source, time.perf_counter() - t)
    return out, todo


def _from_npz(model: nn.Module, spec: ModelSpec, layers: Sequence[int], cfg: StatsConfig,
              record: dict[int, dict[str, Any]]) -> dict[int, torch.Tensor]:
    if len(layers) > 1 and "{layer}" not in cfg.source and "{module}" not in cfg.source:
        raise ValueError(f"stats source {cfg.source!r} is one .npz for layers {list(layers)}: put {{layer}} or "
                         "{module} in the path (the anchors' statistics are one file per layer)")
    out = {}
    for layer in layers:
        module = spec.mlp_out.format(layer)
        path = npz_path(cfg.source, layer, module)
        weight = get_module(model, module).weight
        dim = weight.shape[0] if spec.out_transposed else weight.shape[1]
        cov, count = load_npz(path, dim)
        out[layer] = cov.to(_DTYPES[cfg.dtype])
        record[layer] = provenance(cfg.source, None, count, path)
        log.info("loaded the anchors' C for layer %d from %s (%d keys)", layer, path, count)
    return out


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def second_moment(model: nn.Module, tok: Any, spec: ModelSpec, layer: int, cfg: StatsConfig) -> torch.Tensor:
    """C = E[k kᵀ] of the ``spec.mlp_out`` inputs at ``layer``: [d_ff, d_ff], ``cfg.dtype``, CPU.

    Loads the disk cache when present; otherwise computes (tqdm bar) and writes it.
    """
    return second_moments(model, tok, spec, [layer], cfg)[0][layer]


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None) -> None:
    """Write ``tensors`` as safetensors at ``path`` through a temporary file and a rename, so a killed
    process never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# solving


def inverse_apply(cov: torch.Tensor, x: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``(C + ε I)⁻¹ x`` in float64 via Cholesky, ``ε = ridge · mean(diag C)``; never an explicit inverse.

    Args:
        cov: [m, m] symmetric positive semi-definite.
        x: [m] or [m, k].

    Returns:
        float64 tensor shaped like ``x``, on ``x``'s device.

    Raises:
        torch.linalg.LinAlgError: C + εI is not positive definite (raise ``ridge``).
    """
    return cholesky_solver(cov, ridge)(x)


def cholesky_solver(cov: torch.Tensor, ridge: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> (C + ε I)⁻¹ x`` (float64) that reuses one Cholesky factorisation of C + εI."""
    c = cov.to(torch.float64)
    c = 0.5 * (c + c.T)
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(c)

    def solve(x: torch.Tensor) -> torch.Tensor:
        col = x.to(device=chol.device, dtype=torch.float64)
        res = torch.cholesky_solve(col[:, None] if col.dim() == 1 else col, chol)
        return (res[:, 0] if col.dim() == 1 else res).to(x.device)

    return solve


class StatsCache:
    """C and its factorisation per (layer, config), owned by one algorithm instance.

    The first ``get`` for a layer computes or loads C from the model as it is then: ask before the
    first edit (or in an algorithm's ``prepare``). Not algorithm *state*: it depends only on the
    base model, so it survives the Editor's restores.

    Attributes:
        computed, loaded: layers computed from a corpus / read from the disk cache (for tests and logs).
    """

    def __init__(self) -> None:
        self._cov: dict[tuple, torch.Tensor] = {}
        self._prov: dict[tuple, dict[str, Any]] = {}
        self._solvers: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.computed = 0
        self.loaded = 0

    def get_many(self, model: nn.Module, tok: Any, spec: ModelSpec, layers: Sequence[int],
                 cfg: StatsConfig) -> dict[int, torch.Tensor]:
        """C for several layers; the missing ones in a single pass over the corpus."""
        missing = [layer for layer in layers if (layer, spec.mlp_out, cfg) not in self._cov]
        if missing:
            record: dict[int, dict[str, Any]] = {}
            found, computed = second_moments(model, tok, spec, missing, cfg, record=record)
            self.computed += len(computed)
            self.loaded += len(missing) - len(computed)
            for layer, cov in found.items():
                self._cov[(layer, spec.mlp_out, cfg)] = cov
                self._prov[(layer, spec.mlp_out, cfg)] = record[layer]
        return {layer: self._cov[(layer, spec.mlp_out, cfg)] for layer in layers}

    def get(self, model: nn.Module, tok: Any, spec: ModelSpec, layer: int, cfg: StatsConfig) -> torch.Tensor:
        """C at ``layer`` ([d_ff, d_ff], ``cfg.dtype``, CPU)."""
        return self.get_many(model, tok, spec, [layer], cfg)[layer]

    def solver(self, model: nn.Module, tok: Any, spec: ModelSpec, layer: int,
               cfg: StatsConfig) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> (C + ε I)⁻¹ x`` at ``layer`` with ``cfg.ridge``, the factorisation cached."""
        key = (layer, spec.mlp_out, cfg)
        if key not in self._solvers:
            self._solvers[key] = cholesky_solver(self.get(model, tok, spec, layer, cfg), cfg.ridge)
        return self._solvers[key]

    def note(self, spec: ModelSpec, layer: int, cfg: StatsConfig, record: dict[str, Any]) -> None:
        """Keep the provenance of C at ``layer`` when something derived from it (AlphaEdit's P) was
        loaded instead of C."""
        self._prov[(layer, spec.mlp_out, cfg)] = dict(record)

    def provenance(self, spec: ModelSpec, layer: int, cfg: StatsConfig) -> dict[str, Any]:
        """The ``stats.*`` record of C at ``layer`` (only what ``cfg`` says if C was never loaded)."""
        return self._prov.get((layer, spec.mlp_out, cfg)) or provenance(cfg.source)

    def describe(self, spec: ModelSpec, layers: Sequence[int], cfg: StatsConfig) -> dict[str, Any]:
        """Flat ``stats.*`` provenance of C at ``layers`` for a report: kind, source, file digest,
        sequences and tokens. Values that differ between layers (one ``.npz`` per layer) get a
        ``.<layer>`` suffix; layers whose C was never loaded give only what ``cfg`` says."""
        recs = [self.provenance(spec, layer, cfg) for layer in layers]
        out: dict[str, Any] = {}
        for key in dict.fromkeys(k for rec in recs for k in rec):
            values = [rec.get(key) for rec in recs]
            if all(v == values[0] for v in values):
                out[key] = values[0]
            else:
                out.update({f"{key}.{layer}": v for layer, v in zip(layers, values) if v is not None})
        return out

    def clear(self) -> None:
        self._cov.clear()
        self._prov.clear()
        self._solvers.clear()
