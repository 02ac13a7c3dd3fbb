"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Three runs of one prompt: the clean run; the corrupted run, where Gaussian noise is added to the
embeddings of the subject tokens; and corrupted-with-restoration runs, where chosen states are put
back to their clean values. The probability of the answer token after a restoration, minus its
probability in the corrupted run, is the indirect effect of the restored states.

The prompt, its subject span and the noise come from ``harness.trace.prompts``.

* ``clean_run``, ``restored_probs``: the building blocks; ``restored_probs`` batches noise samples x
  restoration sets in one forward (rows ``sample * n_sets + set``), with forward hooks that add the
  noise at the embedding output and write clean states into chosen (module, token) places.
* ``trace_record``: the whole (token, layer) grid of one prompt for the residual stream (one block
  output restored) and, windowed, for MLP and attention outputs (the outputs of ``window`` layers
  around the centre layer restored, as in ROME's figures).

Speed (the grid is samples x tokens x layers forwards per kind): a restoration at token t cannot
change anything before t (the models are causal), so for each t the corrupted prompt up to t runs
once (a KV cache, per noise sample) and the restorations run only the tokens from t on; and the
blocks below the first restored layer compute nothing new, so they replay the corrupted run's
outputs instead of running (``max_rows`` trades batch size against blocks replayed). Tokens before
the subject are not traced: the corruption cannot reach them, so restoring them has no effect.
Nothing here changes a weight; hooks are removed in ``finally``; tensors follow the model's device.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from harness.algorithms.hooks import hidden_of, model_device, replace_hidden
from harness.models import ModelSpec, cache_kwargs, get_module, num_layers, output_cache
from harness.trace.prompts import TracePrompt

log = logging.getLogger(__name__)

#: What ``trace_record`` can restore: block outputs (the residual stream), MLP outputs, attention outputs.
TRACE_KINDS = ("residual", "mlp", "attn")

#: (module, token) places restored together in one row group.
Restore = Sequence[tuple[str, int]]


def kind_template(spec: ModelSpec, kind: str) -> str:
    """The module-name template (``{}`` = layer) whose output a ``kind`` restores.

    Raises:
        ValueError: ``kind`` is not one of ``TRACE_KINDS``.
    """
    templates = {"residual": spec.layer, "mlp": spec.mlp, "attn": spec.attn}
    if kind not in templates:
        raise ValueError(f"trace kind {kind!r} is not one of {TRACE_KINDS}")
    return templates[kind]


def window_layers(center: int, n_layers: int, window: int) -> range:
    """The layers restored for a point at ``center``: ``window`` layers around it, clipped to the model.

    ``[center - window // 2, center + ceil(window / 2))``, as in ROME: window 10 at layer 12 is 7..16.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return range(max(0, center - window // 2), min(n_layers, center + (window + 1) // 2))


# ----------------------------------------------------------------------------------------------
# hooks and runs


@contextmanager
def _hooked(model: nn.Module, edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Forward hooks that replace the hidden states of each named module by ``edits[name](h)``."""
    handles = []
    try:
        for name, fn in edits.items():
            def hook(_m: nn.Module, _i: Any, out: Any, fn=fn) -> Any:
                return replace_hidden(out, fn(hidden_of(out)))

            handles.append(get_module(model, name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _last_logits(model: nn.Module, spec: ModelSpec, **kw: Any) -> tuple[torch.Tensor, Any]:
    """Logits at the last position ``[B, V]`` and the model output.

    A pre-hook hands the unembedding the last position only, as a contiguous ``[B, 1, d]``: a
    strided slice there (transformers' ``logits_to_keep``) makes torch's CPU matmul read the whole
    vocabulary matrix once per row, which cost more than all the blocks of a short suffix.
    """
    def last_only(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return (args[0][:, -1:].contiguous(), *args[1:]) if args else None

    handle = get_module(model, spec.unembed).register_forward_pre_hook(last_only)
    try:
        out = model(**kw)
    finally:
        handle.remove()
    return out.logits[:, -1], out


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 (an explicit upcast: half-precision logits round small probabilities away)."""
    return torch.softmax(logits.to(torch.float32), dim=-1)


@dataclass(frozen=True)
class CleanRun:
    """The clean run of a prompt.

    Attributes:
        states: module name -> its hidden states ``[T, d]`` (clean).
        probs: next-token distribution after the prompt ``[V]`` (float32).
    """

    states: dict[str, torch.Tensor]
    probs: torch.Tensor


@torch.no_grad()
def clean_run(model: nn.Module, spec: ModelSpec, ids: Sequence[int], modules: Sequence[str]) -> CleanRun:
    """Run the prompt once, keeping the outputs of ``modules``."""
    states: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            states[name] = h[0].detach().clone()
            return h
        return fn

    x = torch.tensor([list(ids)], device=model_device(model))
    with _hooked(model, {m: keep(m) for m in dict.fromkeys(modules)}):
        logits, _ = _last_logits(model, spec, input_ids=x, use_cache=False)
    return CleanRun(states, _probs(logits[0]))


def _corrupt_and_restore(embed: str, noise: torch.Tensor, subject: tuple[int, int], start: int, length: int,
                         n_sets: int, restores: Sequence[Restore], states: dict[str, torch.Tensor],
                         device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Hook functions for one forward over tokens ``start .. start + length - 1``, rows ``sample * n_sets + set``."""
    samples = noise.shape[0]
    edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    # noise at the subject tokens in this window; rows of one sample share its noise
    lo, hi = max(subject[0], start), min(subject[1], start + length)
    noise_rows = noise[:, lo - subject[0]: hi - subject[0]].repeat_interleave(n_sets, dim=0) if hi > lo else None
    # clean values to write: module -> (rows, tokens relative to start, values)
    places: dict[str, list[tuple[int, int]]] = {}
    for s, group in enumerate(restores):
        for module, t in group:
            if not start <= t < start + length:
                raise ValueError(f"cannot restore token {t} of {module!r}: this forward runs tokens "
                                 f"{start}..{start + length - 1}")
            places.setdefault(module, []).append((s, t))
    base = torch.arange(samples, device=device).unsqueeze(1) * n_sets
    writes = {}
    for module, st in places.items():
        sets = torch.tensor([s for s, _ in st], device=device)
        toks = torch.tensor([t for _, t in st], device=device)
        writes[module] = ((base + sets).flatten(), (toks - start).repeat(samples),
                          states[module][toks].repeat(samples, 1))

    def edit(module: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            if module == embed and noise_rows is not None:
                h[:, lo - start: hi - start] += noise_rows.to(h.dtype)
            if module in writes:
                rows, toks, values = writes[module]
                h[rows, toks] = values.to(h.dtype)
            return h
        return fn

    for module in ({embed} if noise_rows is not None else set()) | set(writes):
        edits[module] = edit(module)
    return edits


@dataclass(frozen=True)
class CorruptRun:
    """The corrupted run of a prompt (noise on the subject, nothing restored).

    Attributes:
        p: p(answer) averaged over the noise samples ("low score").
        blocks: each block's output ``[samples, T, d]``, replayed by ``restored_probs`` instead of
            recomputing blocks below the first restored layer; None when the blocks return more
            than a tensor (then every forward computes every block).
    """

    p: float
    blocks: list[torch.Tensor] | None


@torch.no_grad()
def corrupted_run(model: nn.Module, spec: ModelSpec, prompt: TracePrompt, noise: torch.Tensor) -> CorruptRun:
    """Run the corrupted prompt once per noise sample, keeping the block outputs."""
    device = model_device(model)
    n_layers = num_layers(model)
    x = torch.tensor([list(prompt.ids)], device=device).repeat(noise.shape[0], 1)
    edits = _corrupt_and_restore(spec.embed, noise.to(device), prompt.subject, 0, len(prompt.ids), 1, [()], {},
                                 device)
    blocks: dict[int, torch.Tensor] = {}
    plain = True

    def keep(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            nonlocal plain
            plain = plain and isinstance(out, torch.Tensor)
            blocks[layer] = hidden_of(out).detach().clone()
        return hook

    handles = [get_module(model, spec.layer.format(layer)).register_forward_hook(keep(layer))
               for layer in range(n_layers)]
    try:
        with _hooked(model, edits):
            logits, _ = _last_logits(model, spec, input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    p = float(_probs(logits)[:, prompt.answer_id].mean())
    return CorruptRun(p, [blocks[layer] for layer in range(n_layers)] if plain else None)


@torch.no_grad()
def corrupted_prefix(model: nn.Module, spec: ModelSpec, prompt: TracePrompt, noise: torch.Tensor,
                     end: int) -> Any:
    """The KV cache of the corrupted prompt's first ``end`` tokens, one row per noise sample."""
    device = model_device(model)
    x = torch.tensor([list(prompt.ids[:end])], device=device).repeat(noise.shape[0], 1)
    edits = _corrupt_and_restore(spec.embed, noise.to(device), prompt.subject, 0, end, 1, [()], {}, device)
    with _hooked(model, edits):
        _, out = _last_logits(model, spec, input_ids=x, use_cache=True)
    return output_cache(out)


def _expand_cache(cache: Any, samples: int, n_sets: int, device: torch.device) -> Any:
    """A copy of a per-sample cache with each row repeated ``n_sets`` times (rows ``sample * n_sets + set``)."""
    cache = copy.deepcopy(cache)  # a forward appends to the cache it is given
    if n_sets > 1:
        cache.batch_select_indices(torch.arange(samples, device=device).repeat_interleave(n_sets))
    return cache


@contextmanager
def _replayed(model: nn.Module, spec: ModelSpec, outputs: Sequence[Callable[[], torch.Tensor]]) -> Iterator[None]:
    """Blocks ``0 .. len(outputs) - 1`` return ``outputs[layer]()`` instead of computing (hooks still run)."""
    blocks = [get_module(model, spec.layer.format(layer)) for layer in range(len(outputs))]
    saved = [b.__dict__.get("forward") for b in blocks]  # a wrapper (accelerate) may own forward already
    try:
        for block, out in zip(blocks, outputs):
            block.forward = lambda *_a, _out=out, **_k: _out()
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


def _check_replay(spec: ModelSpec, restores: Sequence[Restore], skip: int) -> None:
    """Refuse restorations that replayed blocks would lose (only the last replayed block's output survives)."""
    for module, _ in (place for group in restores for place in group):
        if skip and module == spec.embed:
            raise ValueError(f"cannot restore {module!r} while blocks 0..{skip - 1} are replayed")
        for layer in range(skip):
            block = spec.layer.format(layer)
            if module.startswith(block + ".") or (module == block and layer < skip - 1):
                raise ValueError(f"cannot restore {module!r} while blocks 0..{skip - 1} are replayed")


@torch.no_grad()
def restored_probs(model: nn.Module, spec: ModelSpec, prompt: TracePrompt, clean: CleanRun, noise: torch.Tensor,
                   restores: Sequence[Restore], *, start: int = 0, prefix: Any = None,
                   replay: CorruptRun | None = None, skip: int = 0) -> torch.Tensor:
    """Probability of the answer in corrupted runs with sets of clean states restored.

    One forward of ``samples x len(restores)`` rows. ``restores[i]`` lists the (module, token)
    places whose clean output is written back in row group i; ``[]`` is the plain corrupted run.
    Modules must be among those kept by ``clean_run`` (the embedding module too, to restore it).

    Args:
        noise: ``[samples, n_subject_tokens, d]``, added to the subject tokens' embeddings.
        start: run only the tokens from ``start`` on; ``prefix`` must then be the cache of the
            corrupted tokens before it (``corrupted_prefix(..., end=start)``).
        replay, skip: blocks ``0 .. skip - 1`` replay the corrupted run's outputs instead of
            computing them (hooks on a block still run). Only right when nothing is restored
            inside those blocks (a restored block output is fine: its hook writes it).

    Returns:
        ``[len(restores)]`` float32 on the CPU: p(answer) averaged over the noise samples.

    Raises:
        ValueError: a restored token outside ``start .. T - 1``, or ``start > 0`` without ``prefix``.
    """
    if start > 0 and prefix is None:
        raise ValueError("restored_probs from start > 0 needs the corrupted prefix cache")
    _check_replay(spec, restores, skip)
    device = model_device(model)
    samples, n_sets = noise.shape[0], len(restores)
    length = len(prompt.ids) - start
    x = torch.tensor([list(prompt.ids[start:])], device=device).repeat(samples * n_sets, 1)
    edits = _corrupt_and_restore(spec.embed, noise.to(device), prompt.subject, start, length, n_sets, restores,
                                 clean.states, device)
    kw: dict[str, Any] = {"input_ids": x, "use_cache": prefix is not None}
    if prefix is not None:
        kw.update(cache_kwargs(model, _expand_cache(prefix, samples, n_sets, device)))
    blocks = replay.blocks if replay is not None and replay.blocks is not None else []
    outputs = [lambda h=h: h[:, start:].repeat_interleave(n_sets, dim=0) for h in blocks[:skip]]
    with _replayed(model, spec, outputs), _hooked(model, edits):
        logits, _ = _last_logits(model, spec, **kw)
    p = _probs(logits)[:, prompt.answer_id]
    return p.view(samples, n_sets).mean(0).cpu()


# ----------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class RecordTrace:
    """Causal tracing of one prompt.

    Attributes:
        prompt: what was traced.
        p_clean: p(answer) in the clean run ("high score").
        p_corrupt: p(answer) in the corrupted run, averaged over noise samples ("low score").
        predicted: the model's top token on the clean prompt.
        scores: kind -> ``[T, L]`` p(answer) with that kind restored at (token, centre layer);
            rows before the subject equal ``p_corrupt`` (the corruption does not reach them).
    """

    prompt: TracePrompt
    p_clean: float
    p_corrupt: float
    predicted: int
    scores: dict[str, torch.Tensor]


def trace_record(model: nn.Module, spec: ModelSpec, prompt: TracePrompt, noise: torch.Tensor,
                 kinds: Sequence[str] = TRACE_KINDS, window: int = 10, max_rows: int = 50,
                 step: Callable[[int], Any] | None = None) -> RecordTrace:
    """Trace every (token from the subject on, layer) of one prompt for each kind.

    A prompt whose ``answer_id`` is -1 traces the model's top prediction on the clean prompt.

    Args:
        noise: ``[samples, n_subject_tokens, d]`` (``make_noise``).
        kinds: any of ``TRACE_KINDS``; ``residual`` restores one block output, the others the
            outputs of ``window_layers(layer, L, window)``.
        max_rows: at most this many rows (samples x restored points) per forward.
        step: called after each (token t, kind) with ``T - t``, the tokens each of its forwards
            ran (a measure of the work done, for a progress bar).

    Returns:
        A ``RecordTrace``.

    Raises:
        ValueError: an unknown kind, or a noise tensor that does not fit the subject span.
    """
    n_layers, samples = num_layers(model), noise.shape[0]
    start, end = prompt.subject
    if noise.shape[1] != end - start:
        raise ValueError(f"noise covers {noise.shape[1]} tokens, the subject {end - start}")
    templates = {k: kind_template(spec, k) for k in kinds}
    modules = [spec.embed] + [t.format(layer) for t in templates.values() for layer in range(n_layers)]
    clean = clean_run(model, spec, prompt.ids, modules)
    if prompt.answer_id < 0:  # trace the model's own prediction (ROME's choice)
        prompt = replace(prompt, answer_id=int(clean.probs.argmax()))
    corrupt = corrupted_run(model, spec, prompt, noise)
    p_corrupt = corrupt.p
    n_tok = len(prompt.ids)
    scores = {k: torch.full((n_tok, n_layers), p_corrupt) for k in kinds}
    per_forward = max(1, max_rows // samples)
    for t in range(start, n_tok):
        prefix = corrupted_prefix(model, spec, prompt, noise, t) if t > 0 else None
        for kind, template in templates.items():
            w = 1 if kind == "residual" else window
            for lo in range(0, n_layers, per_forward):
                centres = range(lo, min(n_layers, lo + per_forward))
                restores = [[(template.format(layer), t) for layer in window_layers(c, n_layers, w)] for c in centres]
                # blocks below the first restored place are the corrupted run's: replay them
                skip = lo + 1 if kind == "residual" else window_layers(lo, n_layers, w).start
                scores[kind][t, lo: lo + len(centres)] = restored_probs(
                    model, spec, prompt, clean, noise, restores, start=t, prefix=prefix, replay=corrupt, skip=skip)
            if step is not None:
                step(n_tok - t)
    return RecordTrace(prompt, float(clean.probs[prompt.answer_id]), p_corrupt, int(clean.probs.argmax()), scores)
