"""Generation fluency: weighted n-gram entropy of sampled text (ROME paper, Meng et al. 2022, "GE";
``experiments/py/eval_utils_counterfact.py::n_gram_entropy``; docs/metrics/fluency.md).

Per text, with words from a regex tokenizer and relative n-gram frequencies ``f``:
``H_n = -sum f log2 f`` for n in {2, 3}, and ``GE = mean(2/3 H_2, 4/3 H_3) = H_2/3 + 2 H_3/3``;
a request's ``fluency`` is the mean over its texts (0 for a text too short to hold an n-gram, as in
the anchor). The paper reports GE x 100 (about 620 for GPT-2 XL with 100 new tokens); we keep bits
(unit ``bits``, higher is better, unbounded).

Differences from the anchor, on purpose (cheapness, no extra dependency):
- words come from the regex ``\\w+|[^\\w\\s]`` (runs of word characters, and each punctuation mark
  on its own), an approximation of ``nltk.word_tokenize``; no lower-casing;
- ``max_new_tokens`` defaults to 32 (anchor: 100 tokens), and at most ``max_prompts`` generation
  prompts per request are used (the rewrite prompt when a request has none). Short texts have lower
  entropy, so compare GE only at equal settings.
Generations sample top-k = 5 at temperature 1 (the model's own generation defaults are overridden),
seeded with ``seed`` inside a forked RNG (the caller's random state is untouched), batched with
left padding built here (``harness.tokens.pad_batch``). Texts are prompt + continuation (as the anchor's ``generate_fast``
returns them), special tokens removed, NFKD-normalised.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.registry import register_probe
from harness.tokens import pad_batch, pad_id
from harness.types import EditRequest

INFOS = {"fluency": MetricInfo("fluency", "generation", 1, unit="bits")}

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """The regex word tokenizer: runs of word characters and single punctuation marks."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the relative frequencies of the n-grams of ``tokens`` (0 when none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def generation_entropy(text: str) -> float:
    """ROME's GE of one text: ``H_2/3 + 2 H_3/3`` over its regex words."""
    toks = words(text)
    return (2 / 3 * ngram_entropy(toks, 2) + 4 / 3 * ngram_entropy(toks, 3)) / 2


def prompts_for(request: EditRequest, max_prompts: int | None) -> list[str]:
    """The request's generation prompts (the rewrite prompt when it has none), at most ``max_prompts``."""
    prompts = list(request.generation_prompts) or [request.rewrite_prompt]
    return prompts[:max_prompts] if max_prompts else prompts


def generate(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
             seed: int = 0, top_k: int = 5) -> list[str]:
    """Seeded top-k samples for ``prompts``, batched; returns prompt + continuation per prompt."""
    from transformers import GenerationConfig

    param = next(model.parameters())
    pad = pad_id(tok)
    config = GenerationConfig(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, repetition_penalty=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    fork = dict(devices=[param.device.index or 0], device_type=param.device.type) if param.device.type != "cpu" \
        else dict(devices=[])
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(**fork), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[start:start + batch_size])).input_ids
                ids, mask = (x.to(param.device) for x in pad_batch(enc, pad, side="left"))
                width = ids.shape[1]
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for e, row in zip(enc, out):
                    text = tok.decode(list(e) + row[width:].tolist(), skip_special_tokens=True)
                    texts.append(unicodedata.normalize("NFKD", text))
    finally:
        model.train(was_training)
    return texts


def measure(model: nn.Module, tok, requests: Sequence[EditRequest], max_new_tokens: int = 32,
            batch_size: int = 32, seed: int = 0, max_prompts: int | None = 2) -> list[float]:
    """Per-request ``fluency``: mean GE over the request's generated texts (one generation batch)."""
    per = [prompts_for(r, max_prompts) for r in requests]
    texts = generate(model, tok, [p for ps in per for p in ps], max_new_tokens, batch_size, seed)
    out, i = [], 0
    for ps in per:
        out.append(sum(generation_entropy(t) for t in texts[i:i + len(ps)]) / len(ps))
        i += len(ps)
    return out


@dataclass
class FluencySettings:
    """Settings of the ``fluency`` family.

    Attributes:
        max_new_tokens: tokens generated per prompt.
        max_prompts: generation prompts used per request (None: all of them).
    """

    max_new_tokens: int = 32
    max_prompts: Optional[int] = 2

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"fluency: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompts is not None and self.max_prompts < 0:
            raise ValueError(f"fluency: max_prompts must be >= 0 or None, got {self.max_prompts}")


@register_probe("fluency")
class Fluency(ProbeFamily):
    """Generation entropy of seeded samples; off unless named (the slow family). One random stream
    per call, so a request's samples depend on the batch it is generated in."""

    METRICS = tuple(INFOS.values())
    Settings = FluencySettings
    batch_invariant = False

    def generate(self, model: nn.Module, tok, requests: Sequence[EditRequest]) -> list[float] | None:
        if not self.wanted:
            return None
        s = self.settings
        return measure(model, tok, requests, s.max_new_tokens, self.batch_size, self.seed, s.max_prompts)

    def compute(self, request: EditRequest, scores: Mapping, generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return ({"fluency": generated} if "fluency" in self.wanted else {}), {}
