"""Where the key statistics C come from: the token sequences of a corpus, the anchors' precomputed
second moments, and a record of which of them C rests on (docs/algorithms/key-statistics.md).

Three kinds of source (``StatsConfig.source``):

* ``model``: text sampled from the model itself (``sample_texts``). Deterministic, but not the
  anchors' Wikipedia: numbers are not comparable to the papers', and ``second_moments`` says so.
* a local ``.jsonl`` (one document per line, field ``"text"``) or ``.txt`` (one token stream cut
  into ``seq_len`` chunks) corpus, *sampled* with a fixed seed (``read_corpus``): documents or
  chunks are drawn at random without replacement, not read from the top of the file, so a file
  sorted by topic or date still gives a representative C.
* an ``.npz`` file of ROME/MEMIT's ``layer_stats`` (``load_npz``): the anchors' own statistics,
  ``mom2.mom2`` (Σ k kᵀ) and ``mom2.count`` (N) as their ``CombinedStat(mom2=SecondMoment())``
  stores them; C = mom2 / count as their ``get_cov`` does. The path may contain ``{layer}`` or
  ``{module}`` (their files are one per layer).

``provenance`` returns the flat ``stats.*`` record that algorithms put in their report (so it lands
in the rows' ``report`` column): kind, source, file digest, sequences and tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harness.algorithms.hooks import model_device
from harness.models import cache_kwargs, output_cache

log = logging.getLogger(__name__)

START_WORDS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "One")
CORPUS_SUFFIXES = (".txt", ".jsonl")


def source_kind(source: str) -> str:
    """``"model"``, ``"corpus"`` (.txt/.jsonl) or ``"npz"``.

    Raises:
        ValueError: any other file type.
    """
    if source == "model":
        return "model"
    suffix = Path(source).suffix
    if suffix in CORPUS_SUFFIXES:
        return "corpus"
    if suffix == ".npz":
        return "npz"
    raise ValueError(f"stats source {source!r}: use 'model', a .txt/.jsonl corpus or a layer_stats .npz file")


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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


def read_corpus(tok: Any, path: str | Path, n_samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Token ids of up to ``n_samples`` sequences drawn at random (``random.Random(seed)``, without
    replacement) from a local corpus: ``.jsonl`` documents truncated to ``seq_len``, or ``.txt``
    chunks of ``seq_len`` tokens. Only the drawn documents are tokenized.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a ``.jsonl`` line that is not an object with a string ``"text"`` (line number
            named), or the file yields no sequence of at least two tokens.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stats corpus {str(path)!r} does not exist")
    rng = random.Random(int(seed))
    seqs: list[list[int]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
        rng.shuffle(lines)
        for lineno, line in lines:
            if len(seqs) >= n_samples:
                break
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"stats corpus {str(path)!r} line {lineno}: expected a JSON object with "
                                 f"a string field 'text' ({err})") from err
            if not isinstance(text, str):
                raise ValueError(f"stats corpus {str(path)!r} line {lineno}: 'text' is not a string")
            ids = tok(text)["input_ids"][:seq_len]
            if len(ids) >= 2:
                seqs.append(ids)
    else:
        stream = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        chunks = [c for c in (stream[i:i + seq_len] for i in range(0, len(stream), seq_len)) if len(c) >= 2]
        seqs = rng.sample(chunks, min(n_samples, len(chunks)))
    if not seqs:
        raise ValueError(f"stats corpus {str(path)!r} gave no sequence of at least 2 tokens")
    if len(seqs) < n_samples:
        log.warning("stats corpus %s has only %d sequences (asked for %d)", path, len(seqs), n_samples)
    return seqs


def npz_path(source: str, layer: int, module: str) -> Path:
    """The ``.npz`` file of ``layer``: ``source`` with ``{layer}`` and ``{module}`` filled in."""
    return Path(source.format(layer=layer, module=module)).expanduser()


def load_npz(path: str | Path, dim: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """C = mom2 / count from a ROME/MEMIT ``layer_stats`` file, and count.

    Accepts the anchors' keys ``mom2.mom2`` / ``mom2.count`` (``CombinedStat`` prefixes) or bare
    ``mom2`` / ``count``.

    Args:
        dim: the expected side of C (the module's input width); None skips the check.

    Returns:
        (C as float32 on the CPU, the number of keys it was accumulated over).

    Raises:
        FileNotFoundError: no such file.
        ValueError: keys missing, C not square or not ``dim`` wide, or a count below 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stats npz {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        for mom_key, count_key in (("mom2.mom2", "mom2.count"), ("mom2", "count")):
            if mom_key in keys and count_key in keys:
                mom2, count = np.asarray(data[mom_key]), int(np.asarray(data[count_key]))
                break
        else:
            raise ValueError(f"stats npz {str(path)!r} has keys {sorted(keys)}: expected 'mom2.mom2' and "
                             "'mom2.count' (ROME/MEMIT layer_stats) or 'mom2' and 'count'")
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"stats npz {str(path)!r}: mom2 has shape {mom2.shape}, expected square")
    if dim is not None and mom2.shape[0] != dim:
        raise ValueError(f"stats npz {str(path)!r}: mom2 is {mom2.shape[0]} wide but the module takes {dim} "
                         "inputs (statistics of another model or layer?)")
    if count < 1:
        raise ValueError(f"stats npz {str(path)!r}: count is {count}")
    return torch.from_numpy(mom2).to(torch.float64).div(count).to(torch.float32), count


def provenance(source: str, n_sequences: Optional[int] = None, n_tokens: Optional[int] = None,
               path: Optional[str | Path] = None) -> dict[str, Any]:
    """The flat ``stats.*`` record of where C came from, for reports and logs.

    Args:
        source: ``StatsConfig.source``.
        n_sequences, n_tokens: what C was accumulated over, where known.
        path: the file actually read (an ``.npz`` with its layer filled in); default ``source``.
    """
    kind = source_kind(source)
    rec: dict[str, Any] = {"stats.kind": kind, "stats.source": source}
    file = Path(path or source).expanduser()
    if kind != "model" and file.is_file():  # an .npz template names no single file
        rec["stats.digest"] = file_digest(file)
    if n_sequences is not None:
        rec["stats.n_sequences"] = int(n_sequences)
    if n_tokens is not None:
        rec["stats.n_tokens"] = int(n_tokens)
    return rec
