"""Second-moment statistics of MLP keys, C = E[k kᵀ], for ROME, MEMIT and AlphaEdit
(docs/algorithms/key-statistics.md).

``k`` is the input of the MLP output projection (``spec.mlp_out``) at one layer; C is uncentered,
accumulated over every non-pad token of a corpus and divided by the token count (as ROME's
``layer_stats``). Without the Wikipedia dump the anchors use, the corpus is either text sampled
from the model itself (``source="model"``: a fixed seed, so the same model gives the same text) or
a local file (``.txt``: one token stream cut into ``seq_len`` chunks; ``.jsonl``: one document per
line, field ``"text"``, truncated to ``seq_len``). Gupta et al. ("Efficient Knowledge Editing via
Minimal Precomputation") show far fewer than the anchors' 44M vectors suffice; a ridge (applied
only when solving, ``inverse_apply``) keeps C invertible.

Caching: on disk as safetensors under ``cache_dir`` keyed by the model's weights digest
(``snapshot.model_digest``), the module, the source (+ the file's digest), ``n_samples``,
``seq_len``, ``seed`` and ``dtype``; in memory per algorithm instance through a ``StatsCache``
(no module-level caches). C must come from the unedited model: an algorithm asks for it before its
first edit and keeps it in its ``StatsCache``.
"""
from __future__ import annotations

import hashlib
import json
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

from harness.algorithms.hooks import Hooks, StopForward, first_input, model_device, run_to_stop
from harness.models import ModelSpec, cache_kwargs, default_cache_dir, get_module, output_cache
from harness.snapshot import model_digest
from harness.tokens import pad_batch, pad_id

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
START_WORDS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "One")


@dataclass(frozen=True)
class StatsConfig:
    """Where C comes from and how it is accumulated.

    Attributes:
        source: ``"model"`` (text sampled from the model, top-k 50, fixed ``seed``) or the path of a
            local ``.txt`` / ``.jsonl`` (field ``"text"``) corpus.
        n_samples: number of sequences (documents or chunks), each of at most ``seq_len`` tokens;
            so at most ``n_samples * seq_len`` keys per layer.
        seq_len: tokens per sequence.
        batch_size: sequences per forward pass.
        dtype: accumulation and storage dtype, ``"float32"`` or ``"float64"``.
        ridge: relative ridge for solves: ``C + ridge * mean(diag C) * I`` (``inverse_apply``).
        seed: sampling seed for ``source="model"``.
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
        if self.source != "model":
            path = Path(self.source).expanduser()
            if path.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"stats source {self.source!r}: use 'model' or a .txt/.jsonl file")

    @property
    def root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "stats"


# ----------------------------------------------------------------------------------------------
# corpus


@torch.no_grad()
def sample_texts(model: nn.Module, tok: Any, n_samples: int, seq_len: int, seed: int = 0, batch_size: int = 16,
                 top_k: int = 50) -> list[list[int]]:
    """Token ids of ``n_samples`` sequences of ``seq_len`` tokens sampled from ``model``.

    Each batch starts from one of ``START_WORDS`` (in turn) and continues with top-k sampling
    driven by a ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched), using
    the model's KV cache. Deterministic for a given model, tokenizer and arguments.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dev = model_device(model)
    out: list[list[int]] = []
    n_batches = -(-n_samples // batch_size)
    for b in tqdm(range(n_batches), desc="sampling stats corpus", leave=False):
        n = min(batch_size, n_samples - len(out))
        ids = torch.tensor([tok(START_WORDS[b % len(START_WORDS)])["input_ids"]] * n, device=dev)
        seq, past, step_in = ids, None, ids
        while seq.shape[1] < seq_len:
            res = model(input_ids=step_in, use_cache=True, **cache_kwargs(model, past))
            past = output_cache(res)
            top = res.logits[:, -1].float().cpu().topk(top_k, dim=-1)
            pick = top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=gen)).to(dev)
            seq, step_in = torch.cat([seq, pick], dim=1), pick
        out += seq[:, :seq_len].tolist()
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_corpus(tok: Any, path: str | Path, n_samples: int, seq_len: int) -> list[list[int]]:
    """Token ids from a local corpus: ``.txt`` cut into ``seq_len`` chunks, ``.jsonl`` docs truncated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file yields no sequence of at least two tokens.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stats corpus {str(path)!r} does not exist")
    seqs: list[list[int]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if len(seqs) >= n_samples:
                    break
                if line.strip():
                    ids = tok(json.loads(line)["text"])["input_ids"][:seq_len]
                    if len(ids) >= 2:
                        seqs.append(ids)
    else:
        stream = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        seqs = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)][:n_samples]
        seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError(f"stats corpus {str(path)!r} gave no sequence of at least 2 tokens")
    if len(seqs) < n_samples:
        log.warning("stats corpus %s has only %d sequences (asked for %d)", path, len(seqs), n_samples)
    return seqs


def corpus(model: nn.Module, tok: Any, cfg: StatsConfig) -> list[list[int]]:
    """The token sequences ``cfg`` describes (sampled from ``model`` or read from the file)."""
    if cfg.source == "model":
        return sample_texts(model, tok, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.batch_size)
    return read_corpus(tok, cfg.source, cfg.n_samples, cfg.seq_len)


# ----------------------------------------------------------------------------------------------
# accumulation and disk cache


def stats_path(cfg: StatsConfig, digest: str, module: str) -> Path:
    """The cache file of C for ``module`` of the model with weights ``digest`` under ``cfg``."""
    if cfg.source == "model":
        src = f"model-seed{cfg.seed}"
    else:
        path = Path(cfg.source).expanduser()
        src = f"{path.stem}-{_file_digest(path)}"
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
            x = first_input(args, kwargs)[mask].to(dtype)
            sums[name] = sums.get(name, 0) + (x.T @ x).cpu()
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
    return sums, count


def second_moments(model: nn.Module, tok: Any, spec: ModelSpec, layers: Sequence[int], cfg: StatsConfig,
                   digest: Optional[str] = None) -> tuple[dict[int, torch.Tensor], list[int]]:
    """C = E[k kᵀ] at each layer, from the disk cache where present, else computed in one pass.

    Args:
        layers: layer indices; keys are the inputs of ``spec.mlp_out`` there.
        digest: the model's ``model_digest`` if already known (it costs one pass over the weights).

    Returns:
        (C by layer: [d_ff, d_ff] in ``cfg.dtype`` on the CPU; the layers that were computed, not loaded).
    """
    digest = digest or model_digest(model)
    out: dict[int, torch.Tensor] = {}
    paths = {layer: stats_path(cfg, digest, spec.mlp_out.format(layer)) for layer in layers}
    for layer, path in paths.items():
        if path.is_file():
            out[layer] = load_file(str(path))["mom2"]
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
            _save_atomic(paths[layer], {"mom2": out[layer].contiguous(), "count": torch.tensor(count)},
                         {**meta, "digest": digest, "module": module})
        log.info("computed C for layers %s from %d tokens in %.1fs", todo, count, time.perf_counter() - t)
    return out, todo


def second_moment(model: nn.Module, tok: Any, spec: ModelSpec, layer: int, cfg: StatsConfig) -> torch.Tensor:
    """C = E[k kᵀ] of the ``spec.mlp_out`` inputs at ``layer``: [d_ff, d_ff], ``cfg.dtype``, CPU.

    Loads the disk cache when present; otherwise computes (tqdm bar) and writes it.
    """
    return second_moments(model, tok, spec, [layer], cfg)[0][layer]


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
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
        self._solvers: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.computed = 0
        self.loaded = 0

    def get_many(self, model: nn.Module, tok: Any, spec: ModelSpec, layers: Sequence[int],
                 cfg: StatsConfig) -> dict[int, torch.Tensor]:
        """C for several layers; the missing ones in a single pass over the corpus."""
        missing = [layer for layer in layers if (layer, spec.mlp_out, cfg) not in self._cov]
        if missing:
            found, computed = second_moments(model, tok, spec, missing, cfg)
            self.computed += len(computed)
            self.loaded += len(missing) - len(computed)
            for layer, cov in found.items():
                self._cov[(layer, spec.mlp_out, cfg)] = cov
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

    def clear(self) -> None:
        self._cov.clear()
        self._solvers.clear()
