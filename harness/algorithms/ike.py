"""``ike``: in-context knowledge editing (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by
In-Context Learning?").

IKE changes no weight: the edit is a context put before every prompt the model reads. For an
edited fact ``f`` (rewrite prompt + new target) the context is ``k`` demonstrations followed by the
fact itself:

    New Fact: <demo fact>\\nPrompt: <demo prompt> <demo answer>\\n\\n     (k times)
    New Fact: <f>\\nPrompt: <the prompt being scored>

The demonstrations come from a pool of training records and are of the paper's three types, in
the ratio ``ratio`` (copy : update : retain; the paper uses 1 : 3 : 4 of k = 32):

- **copy**: the pool fact's own prompt -> its new target;
- **update**: a paraphrase of it -> its new target;
- **retain**: one of its neighbourhood prompts -> its own (unchanged) answer.

Retrieval: the paper ranks pool facts by a sentence encoder's similarity to ``f``. Offline we use
**BM25** (Robertson & Zaragoza 2009; k1 = 1.5, b = 0.75) over lowercased word tokens of
"prompt target", the documented substitute; the most similar demonstration comes last, next to
the fact, as in the paper. The pool never holds the evaluated case: records with the same subject
or the same rewrite prompt as any edited fact are left out. The default pool is the shipped
CounterFact and zsRE samples (``harness/data/samples``), which are disjoint from the shared
evaluation windows.

Sequential mode: the memory accumulates the edited facts (with their demonstrations, as JSON);
each scored prompt gets the ``n_facts`` edited facts most similar to it (BM25 over the facts),
most similar last. docs/algorithms/ike.md.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm, register
from harness.algorithms.memory import Context, MemoryState
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

TYPES = ("copy", "update", "retain")
_WORD = re.compile(r"\w+")


@dataclass
class IKEHparams:
    """IKE's settings; defaults are SmolLM2's (conf/algorithm/ike.yaml gives the evidence).

    Attributes:
        k: demonstrations per fact (the paper: 32).
        ratio: copy : update : retain counts of one cycle of demonstration types (the paper: 1 : 3 : 4).
        pool: the pool's data files, each ``<kind>`` (the shipped sample of a ``harness.data`` kind)
            or ``<kind>:<path>``.
        n_facts: edited facts put in the context of one prompt (sequential mode: the most similar).
    """

    k: int = 8
    ratio: list[int] = field(default_factory=lambda: [1, 3, 4])
    pool: list[str] = field(default_factory=lambda: ["counterfact", "zsre"])
    n_facts: int = 1

    def __post_init__(self) -> None:
        if self.k < 0 or self.n_facts < 1:
            raise ValueError(f"ike: k must be >= 0 and n_facts >= 1, got k={self.k}, n_facts={self.n_facts}")
        if len(self.ratio) != 3 or any(r < 0 for r in self.ratio) or not sum(self.ratio):
            raise ValueError(f"ike: ratio must be three counts (copy, update, retain) >= 0, not all 0; got {self.ratio}")
        if not self.pool and self.k:
            raise ValueError("ike: pool must name at least one data file when k > 0")


def words(text: str) -> list[str]:
    """Lowercased word tokens (BM25's terms)."""
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 scores of a query against fixed documents (k1 = 1.5, b = 0.75)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(words(d)) for d in docs]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avg = sum(self.lengths) / len(self.docs) if self.docs else 0.0
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log((n - f + 0.5) / (f + 0.5) + 1) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        """One score per document, in document order."""
        terms = words(query)
        out = []
        for c, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg) if self.avg else self.k1
            out.append(sum(self.idf.get(t, 0.0) * c[t] * (self.k1 + 1) / (c[t] + norm) for t in terms if t in c))
        return out

    def top(self, query: str, n: int, allowed: Sequence[bool] | None = None) -> list[int]:
        """Indices of the ``n`` best documents (ties: earlier first), best first; ``allowed`` filters."""
        s = self.scores(query)
        order = sorted((i for i in range(len(s)) if allowed is None or allowed[i]), key=lambda i: (-s[i], i))
        return order[:n]


def fact_text(r: EditRequest) -> str:
    """The fact as IKE states it: rewrite prompt and new target."""
    return f"{r.rewrite_prompt} {r.target_new}"


def demonstration(r: EditRequest, kind: str) -> str:
    """One demonstration of ``kind`` built from pool record ``r`` (copy when it lacks what ``kind`` needs)."""
    if kind == "update" and r.paraphrase_prompts:
        prompt, answer = r.paraphrase_prompts[0], r.target_new
    elif kind == "retain" and r.neighborhood:
        prompt, answer = r.neighborhood[0].prompt, r.neighborhood[0].answer
    else:
        prompt, answer = r.rewrite_prompt, r.target_new
    return f"New Fact: {fact_text(r)}\nPrompt: {prompt} {answer}\n\n"


def load_pool(specs: Sequence[str]) -> list[EditRequest]:
    """The pool's records, file by file (``<kind>`` or ``<kind>:<path>``).

    Raises:
        AlgorithmError: naming the entry that cannot be read.
    """
    from harness.data import load_requests

    out: list[EditRequest] = []
    for spec in specs:
        kind, _, path = spec.partition(":")
        try:
            out += list(load_requests(kind, path or None, skip_invalid=True))
        except (OSError, ValueError) as exc:
            raise AlgorithmError(f"ike: pool entry {spec!r} cannot be read: {exc}") from exc
    return out


@register("ike")
class IKE(EditAlgorithm):
    """In-context editing: memory = the edited facts with their demonstrations; context = both."""

    Hparams = IKEHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.facts: list[dict[str, str]] = []  # case_id, prompt (rewrite prompt), target, demos
        self._pool: list[EditRequest] | None = None
        self._index: BM25 | None = None

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return set()

    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Load the pool and index it (nothing is derived from the model)."""
        if self._pool is None:
            self._pool = load_pool(self.hparams.pool) if self.hparams.k else []
            self._index = BM25([fact_text(r) for r in self._pool])

    def _types(self) -> list[str]:
        cycle = [t for t, n in zip(TYPES, self.hparams.ratio) for _ in range(n)]
        return [cycle[i % len(cycle)] for i in range(self.hparams.k)]

    def demonstrations(self, request: EditRequest) -> str:
        """The ``k`` demonstrations for ``request``: most similar pool facts, most similar last."""
        self.prepare(None, None)
        if not self.hparams.k:
            return ""
        banned_subjects = {f["subject"] for f in self.facts} | {request.subject}
        banned_prompts = {f["prompt"] for f in self.facts} | {request.rewrite_prompt}
        allowed = [r.subject not in banned_subjects and r.rewrite_prompt not in banned_prompts for r in self._pool]
        best = self._index.top(fact_text(request), self.hparams.k, allowed)
        kinds = self._types()
        return "".join(demonstration(self._pool[i], kinds[rank]) for rank, i in reversed(list(enumerate(best))))

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        for r in requests:
            self.facts.append({"case_id": r.case_id, "subject": r.subject, "prompt": r.rewrite_prompt,
                               "target": r.target_new, "demos": self.demonstrations(r)})
        return EditReport(seconds=time.perf_counter() - t0,
                          info={"retrieval": "bm25", "k": self.hparams.k, "pool_size": len(self._pool or []),
                                "n_facts": len(self.facts)})

    # -- memory -----------------------------------------------------------------------------
    def memory_state(self) -> MemoryState:
        return MemoryState({}, {"facts": [dict(f) for f in self.facts]}) if self.facts else MemoryState()

    def load_memory(self, state: MemoryState) -> None:
        if state.tensors:
            raise AlgorithmError(f"ike: the memory holds no tensors, got {sorted(state.tensors)}")
        facts = state.structure.get("facts", [])
        keys = {"case_id", "subject", "prompt", "target", "demos"}
        if not isinstance(facts, list) or any(not isinstance(f, dict) or set(f) != keys for f in facts):
            raise AlgorithmError(f"ike: memory facts must be objects with exactly the keys {sorted(keys)}")
        self.facts = [dict(f) for f in facts]

    def context(self) -> Context | None:
        if not self.facts:
            return None
        facts, n = [dict(f) for f in self.facts], self.hparams.n_facts
        index = BM25([f"{f['prompt']} {f['target']}" for f in facts]) if len(facts) > n else None

        def transform(prompt: str) -> str:
            chosen = list(range(len(facts))) if index is None else index.top(prompt, n)
            text = "".join(facts[i]["demos"] for i in reversed(chosen))
            text += "".join(f"New Fact: {facts[i]['prompt']} {facts[i]['target']}\n" for i in reversed(chosen))
            return f"{text}Prompt: {prompt}"

        return transform
