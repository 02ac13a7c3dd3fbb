"""Consistency, ROME's reference score (RS): TF-IDF cosine between what the edited model writes about
the subject and reference texts about the new object (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", section 4.2; ``experiments/py/eval_utils_counterfact.py::
test_generation`` and ``tfidf_similarity``, ``dsets/tfidf_stats.py``, ``dsets/attr_snippets.py``;
docs/metrics/consistency.md).

Per request: the texts of the request's generation prompts (the ``fluency`` family's texts, the
same seeded top-5 samples of ``max_length`` tokens in total; generated once when both families
run) are joined with spaces; so are the reference snippets ``snippets[relation_id][target_new_id]``
(Wikipedia passages about subjects whose true object is the new one). Both are turned into TF-IDF
vectors with the user's IDF vector and vocabulary, as scikit-learn's ``TfidfVectorizer`` (which
ROME fits) does with its defaults: lowercased words of two or more word characters
(``(?u)\\b\\w\\w+\\b``), raw counts of vocabulary words times their IDF. The value is their cosine
x 100 (the papers' scale: ROME reports 41.9 for GPT-2 XL edited by ROME); NaN when either text has
no vocabulary word (ROME's numpy division gives NaN there too).

The files are ROME's and cannot be shipped; give their paths:
    idf.npy            float vector, one IDF per vocabulary index
    tfidf_vocab.json   {word: index}
    attribute_snippets.json   [{relation_id, target_id, samples: [{name, text}, ...]}, ...]
                       (ROME's file); a mapping {relation_id: {target_id: [text or {text}, ...]}}
                       is accepted too.

``essence_score`` (protocol ``essence``, version 1; ROME's ``essence_score``, ``test_generation``
and ``util/perplexity.py``): the perplexity of the model on the passages about the subject itself,
the snippets of the same file under ``snippets[relation_id][target_true_id]`` whose ``name`` is the
subject (ROME's code filters ``snips[relation_id][target_new.id]`` by name, where the subject's
own passages are not filed: docs/metrics/consistency.md). They are joined with spaces, tokenised as
the tokenizer does by default and cut to ``ESSENCE_MAX_TOKENS`` (100, ROME's ``max_input_length``);
the value is ``exp(-(1/N) Σ_{t=1}^{N-1} log p(x_t | x_<t))`` with N the number of tokens, ROME's
formula (it divides by N, not by the N-1 predicted tokens). NaN when the request has no
``target_true_id``/``relation_id``, no passage is named after its subject (ROME then reports
none), or the text has fewer than 2 tokens. It reads neither the generations nor the TF-IDF files.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from harness.probes.base import MetricInfo, ProbeFamily
from harness.probes.fluency import generation_texts
from harness.probes.registry import register_probe
from harness.tokens import pad_batch, pad_id
from harness.types import EditRequest

log = logging.getLogger(__name__)

WORD_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
ESSENCE_MAX_TOKENS = 100  # ROME's perplexity(..., max_input_length=100)
ESSENCE_ROWS = 8  # texts per forward: the float32 logits of a row are 100 x vocabulary


class Snippet(NamedTuple):
    """A reference passage: the subject it is about (ROME's ``name``; None when the file gives
    none) and its text."""

    name: Optional[str]
    text: str


class ReferenceError(ValueError):
    """A consistency reference file is missing or malformed, or a request has no reference."""


@dataclass(frozen=True)
class TfidfModel:
    """ROME's TF-IDF statistics: ``vocab`` word -> index into ``idf``."""

    idf: np.ndarray
    vocab: Mapping[str, int]

    def vector(self, text: str) -> np.ndarray:
        """The TF-IDF vector of ``text`` (not normalised; the cosine does not need it)."""
        out = np.zeros(len(self.idf))
        for word, count in Counter(WORD_RE.findall(text.lower())).items():
            index = self.vocab.get(word)
            if index is not None:
                out[index] += count
        return out * self.idf

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the TF-IDF vectors of ``a`` and ``b``; NaN when either has no vocabulary word."""
        va, vb = self.vector(a), self.vector(b)
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        return float(va @ vb) / norm if norm > 0 else math.nan


def _read_json(path: Path, setting: str) -> Any:
    if not path.is_file():
        raise ReferenceError(f"consistency: {setting} file {str(path)!r} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReferenceError(f"consistency: {setting} file {str(path)!r} is not valid JSON: {exc}") from exc


def load_tfidf(idf_path: str | Path, vocab_path: str | Path) -> TfidfModel:
    """ROME's ``idf.npy`` and ``tfidf_vocab.json``.

    Raises:
        ReferenceError: a missing file, an IDF that is not a finite 1-D vector, a vocabulary that is
            not ``{word: index}`` with indices inside the IDF vector (the message names the file).
    """
    idf_path, vocab_path = Path(idf_path).expanduser(), Path(vocab_path).expanduser()
    if not idf_path.is_file():
        raise ReferenceError(f"consistency: idf file {str(idf_path)!r} not found")
    try:
        idf = np.load(idf_path, allow_pickle=False)
    except ValueError as exc:
        raise ReferenceError(f"consistency: idf file {str(idf_path)!r} is not a .npy array: {exc}") from exc
    if idf.ndim != 1 or not np.issubdtype(idf.dtype, np.number) or not np.isfinite(idf).all():
        raise ReferenceError(f"consistency: idf file {str(idf_path)!r} must hold a finite 1-D numeric vector, "
                             f"got shape {idf.shape} dtype {idf.dtype}")
    vocab = _read_json(vocab_path, "vocab")
    if not isinstance(vocab, dict):
        raise ReferenceError(f"consistency: vocab file {str(vocab_path)!r} must be an object {{word: index}}, "
                             f"got {type(vocab).__name__}")
    for word, index in vocab.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(idf):
            raise ReferenceError(f"consistency: vocab file {str(vocab_path)!r}: word {word!r} has index {index!r}, "
                                 f"not in [0, {len(idf)}) (the length of the idf vector)")
    return TfidfModel(idf.astype(np.float64), vocab)


def _snippet(sample: Any, where: str) -> Snippet:
    text = sample.get("text") if isinstance(sample, dict) else sample
    if not isinstance(text, str):
        raise ReferenceError(f"{where}: expected a text or an object with a 'text' string, got {sample!r}")
    name = sample.get("name") if isinstance(sample, dict) else None
    if name is not None and not isinstance(name, str):
        raise ReferenceError(f"{where}: field 'name' must be a string (the subject), got {name!r}")
    return Snippet(name, text)


def load_named_snippets(path: str | Path) -> dict[str, dict[str, list[Snippet]]]:
    """ROME's ``attribute_snippets.json`` as ``{relation_id: {target_id: [Snippet(name, text), ...]}}``.

    Raises:
        ReferenceError: a missing file or a malformed entry (the message names the file, the entry
            and the field).
    """
    path = Path(path).expanduser()
    raw = _read_json(path, "snippets")
    out: dict[str, dict[str, list[Snippet]]] = {}
    if isinstance(raw, list):
        for i, entry in enumerate(raw):
            where = f"consistency: snippets file {str(path)!r}: entry {i}"
            if not isinstance(entry, dict):
                raise ReferenceError(f"{where}: expected an object, got {type(entry).__name__}")
            for field in ("relation_id", "target_id", "samples"):
                if field not in entry:
                    raise ReferenceError(f"{where}: field {field!r} missing")
            if not isinstance(entry["samples"], list):
                raise ReferenceError(f"{where}: field 'samples' must be a list")
            found = [_snippet(s, f"{where}: samples[{j}]") for j, s in enumerate(entry["samples"])]
            out.setdefault(str(entry["relation_id"]), {}).setdefault(str(entry["target_id"]), []).extend(found)
    elif isinstance(raw, dict):
        for rel, targets in raw.items():
            if not isinstance(targets, dict):
                raise ReferenceError(f"consistency: snippets file {str(path)!r}: {rel!r} must map target ids to lists")
            for tid, samples in targets.items():
                where = f"consistency: snippets file {str(path)!r}: {rel!r} -> {tid!r}"
                if not isinstance(samples, list):
                    raise ReferenceError(f"{where}: expected a list of texts")
                out.setdefault(str(rel), {})[str(tid)] = [_snippet(s, f"{where}[{j}]") for j, s in enumerate(samples)]
    else:
        raise ReferenceError(f"consistency: snippets file {str(path)!r} must be a list of "
                             f"{{relation_id, target_id, samples}} (ROME's layout) or a mapping, got {type(raw).__name__}")
    return out


def load_snippets(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """ROME's ``attribute_snippets.json`` as ``{relation_id: {target_id: [text, ...]}}`` (the texts of
    ``load_named_snippets``; same errors)."""
    return _texts(load_named_snippets(path))


def _texts(named: Mapping[str, Mapping[str, list[Snippet]]]) -> dict[str, dict[str, list[str]]]:
    return {rel: {tid: [s.text for s in found] for tid, found in targets.items()} for rel, targets in named.items()}


def essence_perplexity(model: nn.Module, tok: Any, texts: Sequence[str]) -> list[float]:
    """ROME's essence score of each text: ``exp(-(1/N) Σ_{t=1}^{N-1} log p(x_t | x_<t))`` over its
    first N <= ``ESSENCE_MAX_TOKENS`` tokens (the tokenizer's default special tokens included, as
    ROME's ``tok([text], max_length=100, truncation=True)``), in float32.

    Texts run right-padded, ``ESSENCE_ROWS`` a forward (causal attention: padding after a text does
    not reach it).

    Returns:
        One value per text; NaN for a text of fewer than 2 tokens.
    """
    ids = [list(tok(t, truncation=True, max_length=ESSENCE_MAX_TOKENS)["input_ids"]) if t else [] for t in texts]
    out = [math.nan] * len(texts)
    todo = [i for i, x in enumerate(ids) if len(x) >= 2]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(todo), ESSENCE_ROWS):
                rows = todo[start:start + ESSENCE_ROWS]
                x, attn = pad_batch([ids[i] for i in rows], pad_id(tok))
                logits = model(input_ids=x.to(device), attention_mask=attn.to(device), use_cache=False).logits
                logits = logits[:, :-1].float()
                nxt = x[:, 1:].to(logits.device)
                logp = logits.gather(2, nxt[..., None]).squeeze(2) - logits.logsumexp(-1)
                total = (logp * attn[:, 1:].to(logits.device)).sum(1)
                for k, i in enumerate(rows):
                    out[i] = math.exp(-float(total[k]) / len(ids[i]))
    finally:
        model.train(was_training)
    return out


@dataclass
class ConsistencySettings:
    """Settings of the ``consistency`` family.

    Attributes:
        idf: path of ROME's ``idf.npy``.
        vocab: path of ROME's ``tfidf_vocab.json``.
        snippets: path of ROME's ``attribute_snippets.json``.
        max_length, max_prompts: the generations' settings, as the ``fluency`` family's (the
            configs tie them to ``probes.fluency_max_length``/``fluency_max_prompts`` so both
            families read one set of texts).
    """

    idf: Optional[str] = None
    vocab: Optional[str] = None
    snippets: Optional[str] = None
    max_length: int = 100
    max_prompts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"consistency: max_length must be >= 1, got {self.max_length}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"consistency: max_prompts must be >= 1 or None, got {self.max_prompts}")


@register_probe("consistency")
class Consistency(ProbeFamily):
    """ROME's reference score and essence score; off unless named. ``consistency`` needs the three
    reference files, ``essence_score`` the snippets file only.

    Raises (at construction): ``ReferenceError`` for a needed setting left unset or a bad file;
    (when measuring ``consistency``) ``ReferenceError`` for a request without
    ``relation_id``/``target_new_id`` or without snippets for them.
    """

    METRICS = (MetricInfo("consistency", "consistency", 1, unit="cosine x100", bounds=(0.0, 100.0)),
               MetricInfo("essence_score", "essence", 1, unit="perplexity", higher_is_better=False,
                          bounds=(1.0, math.inf), headline=False))
    Settings = ConsistencySettings
    batch_invariant = False
    uses_shared = True

    def __init__(self, metrics: Any = None, settings: Any = None, *, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(metrics, settings, batch_size=batch_size, seed=seed)
        s = self.settings
        needed = ("idf", "vocab", "snippets") if "consistency" in self.wanted else ("snippets",)
        unset = [f"consistency_{k}" for k in needed if getattr(s, k) is None]
        if unset:
            raise ReferenceError(f"consistency: set the path(s) {unset} (ROME's idf.npy, tfidf_vocab.json and "
                                 f"attribute_snippets.json; see docs/metrics/consistency.md)")
        self.tfidf = load_tfidf(s.idf, s.vocab) if "consistency" in self.wanted else None
        self.named = load_named_snippets(s.snippets)
        self.snippets = _texts(self.named)

    def references(self, request: EditRequest) -> list[str]:
        """The snippets about ``request``'s new object.

        Raises:
            ReferenceError: no ids on the request, or no snippets for them.
        """
        if request.relation_id is None or request.target_new_id is None:
            raise ReferenceError(f"consistency: case {request.case_id!r} has no relation_id/target_new_id, which "
                                 f"select its reference snippets (load CounterFact with data=counterfact_rome, "
                                 f"or give them in your JSONL/CSV: docs/data.md)")
        texts = self.snippets.get(request.relation_id, {}).get(request.target_new_id, [])
        if not texts:
            raise ReferenceError(f"consistency: case {request.case_id!r}: the snippets file {self.settings.snippets!r} "
                                 f"has no text for relation_id {request.relation_id!r}, target "
                                 f"{request.target_new_id!r}")
        return texts

    def essence_texts(self, request: EditRequest) -> list[str]:
        """The passages about ``request``'s subject: ``snippets[relation_id][target_true_id]`` named
        after the subject, in file order; empty without those ids or such passages."""
        if request.relation_id is None or request.target_true_id is None:
            return []
        found = self.named.get(request.relation_id, {}).get(request.target_true_id, [])
        return [s.text for s in found if s.name == request.subject]

    def generate(self, model: nn.Module, tok, requests: Sequence[EditRequest],
                 shared: dict | None = None) -> list[dict[str, float]]:
        out: list[dict[str, float]] = [{} for _ in requests]
        if "consistency" in self.wanted:
            assert self.tfidf is not None
            refs = [" ".join(self.references(r)) for r in requests]
            s = self.settings
            texts = generation_texts(model, tok, requests, s.max_length, s.max_prompts, self.batch_size, self.seed,
                                     shared)
            for values, t, ref in zip(out, texts, refs):
                values["consistency"] = 100.0 * self.tfidf.similarity(" ".join(t), ref)
        if "essence_score" in self.wanted:
            essence = [" ".join(self.essence_texts(r)) for r in requests]
            missing = [r.case_id for r, e in zip(requests, essence) if not e]
            if missing:
                log.info("essence_score: no passage about the subject (snippets[relation_id][target_true_id] named "
                         "after it) for %d of %d case(s), e.g. %r: NaN", len(missing), len(requests), missing[0])
            for values, ppl in zip(out, essence_perplexity(model, tok, essence)):
                values["essence_score"] = ppl
        return out

    def compute(self, request: EditRequest, scores: Mapping, generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return {m: generated[m] for m in self.row_metrics()}, {}
