"""Generation fluency: weighted n-gram entropy of sampled text (ROME paper, Meng et al. 2022, "GE";
``experiments/py/eval_utils_counterfact.py::n_gram_entropy``, ``util/generate.py::generate_fast``;
docs/metrics/fluency.md). The entropy and tokenizers are in ``harness.probes.ngrams``.

Two families, one metric each:
- ``fluency`` (protocol ``generation`` version 2, the reference's semantics): every generation prompt
  of a request (``max_prompts`` may cap them), top-k = 5 samples up to ``max_length`` = 100 tokens in
  total, prompt included, with no early stop at EOS; NLTK-compatible words; reported as the papers
  do, GE x 100 (unedited GPT-2 XL: about 620).
- ``fluency_short`` (protocol ``generation`` version 1, the harness's earlier default): 32 new
  tokens stopping at EOS, at most 2 prompts, regex words, in bits.

Both sample at temperature 1 (the model's own generation defaults are overridden), seeded with
``seed`` inside a forked RNG (the caller's random state is untouched), batched with left padding
built here (``harness.tokens.pad_batch``). Texts are prompt + continuation (as ``generate_fast``
returns them), special tokens removed, NFKD-normalised; version 2 also replaces blank lines by a
space, as the reference does. A request's value is the mean over its texts.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.ngrams import generation_entropy, nltk_words, regex_words
from harness.probes.registry import register_probe
from harness.tokens import pad_batch, pad_id
from harness.types import EditRequest

INFOS = {"fluency": MetricInfo("fluency", "generation", 2, unit="bits x100"),
         "fluency_short": MetricInfo("fluency_short", "generation", 1, unit="bits")}


def prompts_for(request: EditRequest, max_prompts: int | None) -> list[str]:
    """The request's generation prompts (the rewrite prompt when it has none), at most ``max_prompts``."""
    prompts = list(request.generation_prompts) or [request.rewrite_prompt]
    return prompts[:max_prompts] if max_prompts else prompts


def sample_ids(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
               seed: int = 0, top_k: int = 5, max_length: int | None = None) -> list[list[int]]:
    """Seeded top-k samples for ``prompts``, batched: the prompt's token ids + the sampled ones.

    Args:
        max_new_tokens: tokens sampled per prompt, stopping early at the tokenizer's EOS (used when
            ``max_length`` is None).
        max_length: when given, each prompt is continued to ``max_length`` tokens in total, prompt
            included (none for a longer prompt), without stopping at EOS (ROME's ``generate_fast``).
    """
    from transformers import GenerationConfig

    param = next(model.parameters())
    pad = pad_id(tok)
    fork = dict(devices=[param.device.index or 0], device_type=param.device.type) if param.device.type != "cpu" \
        else dict(devices=[])
    out_ids: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(**fork), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[start:start + batch_size])).input_ids
                budgets = [max_new_tokens if max_length is None else max(max_length - len(e), 0) for e in enc]
                rows: list[list[int]] = [[] for _ in enc]
                if max(budgets) > 0:
                    ids, mask = (x.to(param.device) for x in pad_batch(enc, pad, side="left"))
                    # eos_token_id=[]: no EOS stop (None would fall back to the model's own EOS)
                    eos = tok.eos_token_id if max_length is None else []
                    config = GenerationConfig(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                                              repetition_penalty=1.0, max_new_tokens=max(budgets),
                                              pad_token_id=pad, eos_token_id=eos)
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                    rows = [row[ids.shape[1]:ids.shape[1] + n].tolist() for row, n in zip(out, budgets)]
                out_ids += [list(e) + row for e, row in zip(enc, rows)]
    finally:
        model.train(was_training)
    return out_ids


def generate(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
             seed: int = 0, top_k: int = 5, max_length: int | None = None) -> list[str]:
    """``sample_ids`` decoded: prompt + continuation per prompt, special tokens removed, NFKD-normalised;
    with ``max_length`` (version 2) blank lines also become a space, as in ROME's ``generate_fast``."""
    texts = []
    for ids in sample_ids(model, tok, prompts, max_new_tokens, batch_size, seed, top_k, max_length):
        text = unicodedata.normalize("NFKD", tok.decode(ids, skip_special_tokens=True))
        texts.append(text if max_length is None else text.replace("\n\n", " "))
    return texts


def _per_request(per: Sequence[Sequence[str]], texts: Sequence[str], words: Callable[[str], list[str]],
                 scale: float) -> list[float]:
    """Mean GE (times ``scale``) of each request's slice of ``texts``."""
    out, i = [], 0
    for ps in per:
        out.append(scale * sum(generation_entropy(t, words) for t in texts[i:i + len(ps)]) / len(ps))
        i += len(ps)
    return out


def generation_texts(model: nn.Module, tok, requests: Sequence[EditRequest], max_length: int = 100,
                     max_prompts: int | None = None, batch_size: int = 32, seed: int = 0,
                     shared: dict | None = None) -> list[list[str]]:
    """Per request, the version 2 texts (``max_length`` tokens, prompt included) of its prompts.

    Args:
        shared: a dict that lives for one suite ``measure`` call (``ProbeFamily.uses_shared``):
            texts generated with the same settings for the same requests are taken from it instead
            of sampled again, so ``fluency`` and ``consistency`` read the same texts.
    """
    per = [prompts_for(r, max_prompts) for r in requests]
    key = ("generation_texts", max_length, max_prompts, batch_size, seed, tuple(map(tuple, per)))
    if shared is not None and key in shared:
        return shared[key]
    texts = generate(model, tok, [p for ps in per for p in ps], batch_size=batch_size, seed=seed,
                     max_length=max_length)
    out, i = [], 0
    for ps in per:
        out.append(texts[i:i + len(ps)])
        i += len(ps)
    if shared is not None:
        shared[key] = out
    return out


def measure(model: nn.Module, tok, requests: Sequence[EditRequest], max_length: int = 100,
            batch_size: int = 32, seed: int = 0, max_prompts: int | None = None,
            shared: dict | None = None) -> list[float]:
    """Per-request ``fluency`` (version 2): mean GE x 100 over texts of ``max_length`` tokens."""
    texts = generation_texts(model, tok, requests, max_length, max_prompts, batch_size, seed, shared)
    return [100.0 * sum(generation_entropy(t, nltk_words) for t in ts) / len(ts) for ts in texts]


def measure_short(model: nn.Module, tok, requests: Sequence[EditRequest], max_new_tokens: int = 32,
                  batch_size: int = 32, seed: int = 0, max_prompts: int | None = 2) -> list[float]:
    """Per-request ``fluency_short`` (version 1): mean GE in bits over ``max_new_tokens``-token samples."""
    per = [prompts_for(r, max_prompts) for r in requests]
    texts = generate(model, tok, [p for ps in per for p in ps], max_new_tokens, batch_size, seed)
    return _per_request(per, texts, regex_words, 1.0)


@dataclass
class FluencySettings:
    """Settings of the ``fluency`` family.

    Attributes:
        max_length: tokens per text, prompt included (ROME: 100).
        max_prompts: generation prompts used per request (None: all of them, as ROME).
    """

    max_length: int = 100
    max_prompts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"fluency: max_length must be >= 1, got {self.max_length}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"fluency: max_prompts must be >= 1 or None, got {self.max_prompts}")


@dataclass
class FluencyShortSettings:
    """Settings of the ``fluency_short`` family.

    Attributes:
        max_new_tokens: tokens generated per prompt.
        max_prompts: generation prompts used per request (None or 0: all of them).
    """

    max_new_tokens: int = 32
    max_prompts: Optional[int] = 2

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"fluency_short: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompts is not None and self.max_prompts < 0:
            raise ValueError(f"fluency_short: max_prompts must be >= 0 or None, got {self.max_prompts}")


@register_probe("fluency")
class Fluency(ProbeFamily):
    """Generation entropy of seeded samples with ROME's semantics; off unless named (the slow family).
    One random stream per call, so a request's samples depend on the batch it is generated in."""

    METRICS = (INFOS["fluency"],)
    Settings = FluencySettings
    batch_invariant = False
    uses_shared = True

    def generate(self, model: nn.Module, tok, requests: Sequence[EditRequest],
                 shared: dict | None = None) -> list[float] | None:
        if not self.wanted:
            return None
        s = self.settings
        return measure(model, tok, requests, s.max_length, self.batch_size, self.seed, s.max_prompts, shared)

    def compute(self, request: EditRequest, scores: Mapping, generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return ({"fluency": generated} if "fluency" in self.wanted else {}), {}


@register_probe("fluency_short")
class FluencyShort(ProbeFamily):
    """The earlier, cheaper fluency (protocol ``generation`` version 1); off unless named."""

    METRICS = (INFOS["fluency_short"],)
    Settings = FluencyShortSettings
    batch_invariant = False

    def generate(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[float] | None:
        if not self.wanted:
            return None
        s = self.settings
        return measure_short(model, tok, requests, s.max_new_tokens, self.batch_size, self.seed, s.max_prompts)

    def compute(self, request: EditRequest, scores: Mapping, generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return ({"fluency_short": generated} if "fluency_short" in self.wanted else {}), {}
