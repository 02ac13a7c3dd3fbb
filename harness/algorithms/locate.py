"""Locate-then-edit building blocks shared by ROME, MEMIT and AlphaEdit (docs/algorithms/locate.md).

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", ROME), Meng et al. 2023
("Mass-Editing Memory in a Transformer", MEMIT), Gupta et al. 2024 ("Rebuilding ROME").

* ``subject_last_index``: the token index of the subject's last piece (cumulative encodings).
* ``generate_context_templates`` / ``TemplateCache`` (settings: ``TemplateHparams``): random
  prefixes ``"<text>. {}"`` sampled (top-k 5, fixed seed) from the unedited model.
* ``compute_keys``: the input of the MLP output projection ("key") at the subject's last token,
  averaged over templates (flat list, or groups averaged within then across).

The target vector (ROME's v*, MEMIT's z) is ``target.py``'s; the hooks used here are ``hooks.py``'s.
Token positions are read from batches padded on the right (``harness.tokens.encode_right_padded``),
whatever ``tok.padding_side`` is: the index of a token is then the same as in its unpadded encoding,
and so are the position ids. Functions here run without gradients, remove their hooks, and change
no weights.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.algorithms.hooks import model_device, module_input
from harness.models import ModelSpec, get_module, num_layers
from harness.tokens import encode_right_padded
from harness.types import EditRequest

log = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")  # EasyEdit's prefixes for context templates


def fill_template(template: str, prompt: str) -> str:
    """``template`` with its ``{}`` replaced by ``prompt`` (which keeps its own ``{}`` for the subject)."""
    if template.count("{}") != 1:
        raise ValueError(f"context template must contain exactly one '{{}}': {template!r}")
    return template.replace("{}", prompt, 1)


# ----------------------------------------------------------------------------------------------
# subject position


def subject_last_index(tok: Any, text_template: str, subject: str) -> int:
    """Index of the subject's last token in ``tok(text_template with subject)["input_ids"]``.

    Cumulative method of docs/algorithms/locate.md: for ``A{}B`` the index is ``len(enc(A + subject)) - 1``,
    which counts a BOS the same way the full encoding does. Checked by decoding: ``enc(A+subject)``
    must be a prefix of the full encoding. When the tokenizer merges the subject's end with the
    suffix, the token that holds the subject's last character is taken instead (a warning).

    Args:
        tok: a Hugging Face tokenizer (with its default special-token settings).
        text_template: text with exactly one ``{}`` where the subject goes.
        subject: the subject string.

    Returns:
        A non-negative token index.

    Raises:
        ValueError: no ``{}``/several, an empty subject, or no token found for the subject's end.
    """
    if text_template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {text_template!r}")
    if not subject:
        raise ValueError("empty subject")
    prefix, suffix = text_template.split("{}")
    upto = tok(prefix + subject)["input_ids"]
    full = tok(prefix + subject + suffix)["input_ids"]
    idx = len(upto) - 1
    if idx >= 0 and full[: len(upto)] == upto:
        return idx
    # Merge across the subject/suffix boundary: find the token covering the subject's last character.
    end = len(prefix + subject) - 1
    if getattr(tok, "is_fast", False):
        offsets = tok(prefix + subject + suffix, return_offsets_mapping=True)["offset_mapping"]
        for i, (s, e) in enumerate(offsets):
            if s <= end < e:
                log.warning("subject %r merges with the text after it in %r; using token %d (%r)",
                            subject, text_template, i, tok.decode(full[i: i + 1]))
                return i
    raise ValueError(f"cannot locate the last token of subject {subject!r} in {text_template!r}")


# ----------------------------------------------------------------------------------------------
# context templates


def _counts(count: int, n: int) -> list[int]:
    return [count // n + (1 if i < count % n else 0) for i in range(n)]


@torch.no_grad()
def generate_context_templates(model: nn.Module, tok: Any, length_params: Sequence[Sequence[int]], seed: int = 0,
                               seed_words: Sequence[str] = SEED_WORDS, top_k: int = 5) -> list[str]:
    """Random-prefix templates ``["{}", "<text>. {}", ...]`` sampled from ``model`` (docs/algorithms/locate.md).

    For each ``(length, count)`` pair, ``count`` texts of ``length`` tokens in total (the seed word
    and any BOS included, as in ROME's ``generate_fast``) are sampled with top-k sampling; the seed
    words are used in turn (EasyEdit). ``{``/``}`` are replaced by spaces so the only braces left are
    the subject slot. Deterministic: a ``torch.Generator`` seeded with ``seed``, greedy-free sampling
    on the CPU, no global RNG touched.

    Args:
        length_params: e.g. ``[[5, 10], [10, 10]]`` -> 1 + 10 + 10 = 21 templates.
        seed: generator seed.

    Returns:
        Templates, ``"{}"`` first, then per pair in order.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dev = model_device(model)
    out = ["{}"]
    for length, count in length_params:
        for word, n in zip(seed_words, _counts(int(count), len(seed_words))):
            if n == 0:
                continue
            ids = torch.tensor([tok(word)["input_ids"]] * n, device=dev)
            for _ in range(max(1, int(length) - ids.shape[1])):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
                top = logits.topk(top_k, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                ids = torch.cat([ids, top.indices.gather(1, pick).to(dev)], dim=1)
            for row in ids.tolist():
                text = tok.decode(row, skip_special_tokens=True).replace("{", " ").replace("}", " ")
                out.append(text + ". {}")
    return out


def _model_signature(model: nn.Module) -> tuple:
    cfg = getattr(model, "config", None)
    return (type(model).__name__, getattr(cfg, "name_or_path", None), getattr(cfg, "vocab_size", None),
            num_layers(model), getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)))


def _rome_length_params() -> list[list[int]]:
    return [[5, 10], [10, 10]]


@dataclass
class TemplateHparams:
    """Which context templates an algorithm samples (``generate_context_templates``).

    Attributes:
        length_params: ``[[length, count], ...]``: per pair, ``count`` texts of ``length`` tokens;
            the default ``[[5, 10], [10, 10]]`` (ROME's) gives 1 + 10 + 10 = 21 templates.
        seed: seed of the sampling.
    """

    length_params: list[list[int]] = field(default_factory=_rome_length_params)
    seed: int = 0

    def __post_init__(self) -> None:
        self.length_params = [[int(x) for x in p] for p in self.length_params]
        if any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in self.length_params):
            raise ValueError("templates.length_params must be [[length >= 1, count >= 0], ...], "
                             f"got {self.length_params}")


class TemplateCache:
    """Context templates of one algorithm instance, generated at first use and then reused.

    Keyed by (architecture signature, length params, seed, seed words), deliberately not by a weights
    digest: in a sequential run the templates must stay those of the unedited model, and the weights
    change after each edit. Use one instance (one cache) per base model; ``clear()`` forgets all.

    Attributes:
        misses: how many template sets were generated (for tests and logs).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, list[str]] = {}
        self.misses = 0

    def get(self, model: nn.Module, tok: Any, length_params: Sequence[Sequence[int]], seed: int = 0,
            seed_words: Sequence[str] = SEED_WORDS) -> list[str]:
        """The templates for these parameters, generated with ``generate_context_templates`` on a miss."""
        key = (_model_signature(model), tuple(tuple(int(x) for x in p) for p in length_params), int(seed),
               tuple(seed_words))
        if key not in self._entries:
            t = time.perf_counter()
            self._entries[key] = generate_context_templates(model, tok, length_params, seed, seed_words)
            self.misses += 1
            log.info("generated %d context templates in %.1fs", len(self._entries[key]), time.perf_counter() - t)
        return list(self._entries[key])

    def clear(self) -> None:
        self._entries.clear()


# ----------------------------------------------------------------------------------------------
# keys


def as_template_groups(templates: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """A flat template list as one group; a list of groups checked and copied."""
    if not templates:
        raise ValueError("no templates")
    if all(isinstance(t, str) for t in templates):
        return [list(templates)]  # type: ignore[arg-type]
    groups = [list(g) for g in templates]
    if any(not g or not all(isinstance(t, str) for t in g) for g in groups):
        raise ValueError("templates must be a list of strings or a list of non-empty lists of strings")
    return groups


@torch.no_grad()
def module_inputs_at(model: nn.Module, tok: Any, module: str, texts: Sequence[str], index: Sequence[int],
                     batch_size: int = 32) -> torch.Tensor:
    """The input of ``module`` at token ``index[i]`` of ``texts[i]``, for every i.

    The forward stops as soon as ``module`` has been reached (later blocks are not run).

    Returns:
        [len(texts), width] float32 tensor on the model's device.
    """
    dev = model_device(model)
    target = get_module(model, module)
    rows: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        enc = encode_right_padded(tok, texts[start:start + batch_size], dev)
        idx = torch.tensor(index[start:start + batch_size], device=dev)
        x = module_input(model, target, **enc, use_cache=False)
        rows.append(x[torch.arange(len(idx), device=dev), idx].float())
    return torch.cat(rows)


def compute_keys(model: nn.Module, tok: Any, spec: ModelSpec, layer: int, requests: Sequence[EditRequest],
                 templates: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 32) -> torch.Tensor:
    """Template-averaged keys: the input of ``spec.mlp_out`` at ``layer`` at the subject's last token.

    Args:
        templates: a flat list (ROME: plain mean over all) or a list of groups (MEMIT/AlphaEdit:
            mean within each group, then mean across groups). Each template holds one ``{}``
            where the request's prompt goes.

    Returns:
        [len(requests), d_ff] float32 on the model's device; row i belongs to ``requests[i]``.
    """
    groups = as_template_groups(templates)
    texts, index = [], []
    for req in requests:
        for group in groups:
            for t in group:
                filled = fill_template(t, req.prompt)
                texts.append(filled.replace("{}", req.subject))
                index.append(subject_last_index(tok, filled, req.subject))
    keys = module_inputs_at(model, tok, spec.mlp_out.format(layer), texts, index, batch_size)
    out, pos = [], 0
    for _ in requests:
        means = []
        for group in groups:
            means.append(keys[pos:pos + len(group)].mean(0))
            pos += len(group)
        out.append(torch.stack(means).mean(0))
    return torch.stack(out)

