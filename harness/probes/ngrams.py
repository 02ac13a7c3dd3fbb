"""Word tokenizers and the weighted n-gram entropy of the ROME paper (Meng et al. 2022, "GE";
``experiments/py/eval_utils_counterfact.py::n_gram_entropy``; docs/metrics/fluency.md).

``GE = mean(2/3 H_2, 4/3 H_3)`` where ``H_n = -sum f log2 f`` over the relative frequencies ``f`` of
a text's word n-grams (0 for a text too short to hold one).

Two tokenizers:
- ``nltk_words``: NLTK-compatible words, as ``nltk.word_tokenize`` (the reference) gives them. That
  function splits sentences with the Punkt model, whose data is a separate download; here sentences
  are split with a rule instead (after ``.``, ``!`` or ``?``, closing quotes or brackets included,
  before whitespace and a capital letter or digit) and each sentence goes through NLTK's own ``NLTKWordTokenizer`` (the word step
  of ``word_tokenize``). The two differ only where Punkt knows better than the rule: a known
  abbreviation before a capital (``Mr. Smith``: the rule splits, Punkt does not) and a sentence
  starting in lower case (Punkt splits, the rule does not).
- ``regex_words``: ``\\w+|[^\\w\\s]`` (runs of word characters, each punctuation mark on its own), the
  approximation of protocol ``generation`` version 1 (``fluency_short``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

_WORD = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]}]*)\s+(?=[\"'(\[`]*[A-Z0-9])")


def regex_words(text: str) -> list[str]:
    """Runs of word characters and single punctuation marks (the version 1 tokenizer)."""
    return _WORD.findall(text)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def sentences(text: str) -> list[str]:
    """``text`` split after sentence-final ``.``/``!``/``?`` (and closing quotes or brackets) before
    whitespace and a capital letter or digit; a stand-in for Punkt that needs no downloaded model."""
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        parts.append(text[start:m.end(1)])
        start = m.end()
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def nltk_words(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` without the Punkt download: rule-split sentences, then NLTK's
    ``NLTKWordTokenizer`` on each (see the module docstring)."""
    tokenize = _word_tokenizer().tokenize
    return [w for s in sentences(text) for w in tokenize(s)]


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the relative frequencies of the n-grams of ``tokens`` (0 when none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def generation_entropy(text: str, words: Callable[[str], list[str]] = nltk_words) -> float:
    """ROME's GE of one text in bits: ``(2/3 H_2 + 4/3 H_3) / 2`` over its words."""
    toks = words(text)
    return (2 / 3 * ngram_entropy(toks, 2) + 4 / 3 * ngram_entropy(toks, 3)) / 2
