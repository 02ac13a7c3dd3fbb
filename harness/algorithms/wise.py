"""``wise``: lifelong editing with a side memory and routing (Wang et al., NeurIPS 2024, "WISE: Rethinking
the Knowledge Memory for Lifelong Model Editing of Large Language Models"), docs/algorithms/wise.md.

The main memory (every weight of the model) is never written. Edits go to a side memory: a copy of
one layer's FFN down projection, kept as ``Δ = W' - W`` (``wise_memory``), consulted through a
forward hook on that projection (``wise_memory.WiseHook``): at each position the output is the main memory's,
or, where the activation score ``||A(x) Δᵀ||`` (running mean over the tokens so far) exceeds the
memory's threshold ε, the side memory's.

Training one batch of edits (``wise_train.train_shard``; EasyEdit's ``WISE.edit``, written anew):
* rows: every context template (``templates``, sampled from the base model) around each request's
  prompt + target, plus ``irrelevant.per_edit`` irrelevant texts per request (the reference takes
  zsRE *train* records' ``loc + " " + loc_ans``; see ``IrrelevantHparams``); the forward adds
  ``A(x) Δᵀ`` on every row;
* loss: the target NLL of the template rows plus the paper's margin losses on the running-mean
  scores ``s``: ``mean⁺(s_irr - α) + mean⁺(β - s_edit) + mean⁺(γ - (s_edit - max s_irr))``
  (``mean⁺``: mean over the violating entries, as the reference); ``s_edit`` is read at the
  positions whose logits predict target tokens, ``s_irr`` at every token of the irrelevant rows;
* SGD on Δ with the shard's random gradient mask (ratio ρ), Δ clamped to ``±norm_constraint``;
  stops early when the loss falls below ``early_stop_loss``;
* afterwards each request's score (the smallest running mean over its target-predicting positions,
  over its template rows) updates the shard's ``min_score``; ε = ``act_ratio · min_score``. With
  ``live_threshold`` the shard keeps its edit rows' layer inputs and ``min_score`` is the smallest
  *current* score of all of them; ``replay`` puts some of them in the margins as well.

Sharding and merging: a new shard (fresh Δ, fresh mask) starts every ``shard_size`` edits; every
``merge_every`` edits the shards are TIES-merged (``merge_density``) into the side memory, or, with
``retrieve``, into one more side memory among which routing picks the highest score (with
``relative_routing``: the highest score / ε).

Deviations from the reference, each for a reason: routing per position by the running mean (the
harness batches right-padded inputs; module docstring of ``wise_memory``); no SGD weight decay (in
the reference it shrinks every entry of W' towards zero, masked or not); the NLL is read on the
target tokens only (the reference's ``only_label`` mask starts one token early).

Contract (``harness.algorithms.memory``): no parameter is declared or written; the side memory is
the algorithm's memory (``memory_state``: each memory's Δ as a tensor, its edit count and score and
the layer as JSON structure), ``attach`` installs the routing hook, ``detach`` removes it.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm, register
from harness.algorithms.finetune import seeded
from harness.algorithms.locate import TemplateCache, TemplateHparams
from harness.algorithms.memory import Installation, MemoryState
from harness.algorithms.wise_memory import SideMemory, WiseHook, gradient_mask, stored_scores
from harness.algorithms.wise_train import activation_basis, projection, train_shard
from harness.models import model_spec
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

DEFAULT_IRRELEVANT = Path(__file__).resolve().parents[1] / "data" / "samples" / "capability-corpus.txt"


def _wise_templates() -> TemplateHparams:
    return TemplateHparams(length_params=[[5, 2]])  # 1 + 2 rows (EasyEdit's wise_main: [[5, 5], [10, 5]], 11 rows)


@dataclass
class IrrelevantHparams:
    """Where the irrelevant inputs of the margin loss come from.

    Attributes:
        path: None: the sentences of the shipped ``capability-corpus.txt`` (neutral encyclopedic
            text). Else a ``.txt`` (one text per non-empty line), or a ``.json``/``.jsonl`` of records:
            strings, MEND zsRE records (``loc + " " + loc_ans``, as EasyEdit's WISE runs take from
            zsRE's train split) or EasyEdit CounterFact records (``locality_prompt`` +
            ``locality_ground_truth``). Never the records being evaluated: their locality prompts
            would leak into training.
        offset, limit: the slice of the pool used.
        per_edit: irrelevant texts per request (the reference: 1). The k-th edit of a run takes
            pool entries ``k·per_edit ...`` cyclically, so a resumed run takes the same ones.
    """

    path: Optional[str] = None
    offset: int = 0
    limit: Optional[int] = None
    per_edit: int = 1

    def __post_init__(self) -> None:
        if self.offset < 0 or (self.limit is not None and self.limit < 1) or self.per_edit < 1:
            raise ValueError(f"irrelevant: offset >= 0, limit None or >= 1 and per_edit >= 1 required, got "
                             f"offset={self.offset} limit={self.limit} per_edit={self.per_edit}")


@dataclass
class WiseHparams:
    """WISE's hyperparameters; defaults are SmolLM2-135M's (conf/algorithm/wise.yaml gives the evidence).

    Attributes:
        layer: the layer whose MLP down projection gets the side memory.
        num_steps: optimisation steps per batch of edits (EasyEdit ``n_iter``).
        lr: SGD learning rate on Δ (``edit_lr``).
        alpha, beta, gamma: margins: irrelevant scores below α, edit scores above β, and edit scores
            at least γ above the irrelevant ones (``act_margin``).
        margin_weight: weight of the margin losses against the target NLL (the reference: 1). The
            margins' gradient on Δ scales with the squared activation norm at the layer, the NLL's
            much less, so one SGD step size cannot suit both on every model.
        act_ratio: ε = act_ratio · the smallest edit score of a memory.
        mask_ratio: ρ, the fraction of Δ's entries a shard may train.
        norm_constraint: Δ's entries are clamped to ±this; None: no clamp.
        shard_size: edits per shard (``save_freq``).
        merge_every: edits per merge of the shards (``merge_freq``); a multiple of shard_size.
        merge_density: TIES trim density (``densities``).
        retrieve: keep one merged memory per merge period and route to the highest score (WISE-Retrieve).
        relative_routing: among the memories above their own ε, the one with the highest score / ε
            answers; False: the highest score (the paper). Matters only with several memories.
        early_stop_loss: stop a batch's training once its total loss is below this.
        project_out: k > 0: every step on Δ is kept orthogonal, on its input side, to the top k
            directions of the FFN activations of the irrelevant pool (``wise_train.activation_basis``),
            so Δ answers to what is particular to an edit's activations, not to what all text shares;
            0: off, as in the paper (docs/algorithms/wise.md, deviations).
        replay: k > 0: the margins' edit side also holds k stored rows of earlier edits of the same
            memory (drawn per batch), so later training cannot push their scores below β; each edit's
            rows' layer inputs are then kept in the memory (``Memory.keys``). 0: off, as in the paper.
        live_threshold: ε from the *current* scores of every stored edit row (recomputed after each
            batch and merge) instead of the smallest score each edit had when it was trained, which
            goes stale as later edits move Δ; keeps the rows as ``replay`` does. False: the paper's.
        templates: context templates around the prompt (sampled from the base model in ``prepare``).
        irrelevant: the irrelevant inputs of the margin loss.
        seed: seeds the gradient masks (with the shard's index).
    """

    layer: int = 24
    num_steps: int = 30
    lr: float = 1.0
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    margin_weight: float = 0.1
    act_ratio: float = 0.88
    mask_ratio: float = 0.2
    norm_constraint: Optional[float] = 1.0
    shard_size: int = 1
    merge_every: int = 1
    merge_density: float = 0.53
    retrieve: bool = True
    relative_routing: bool = True
    early_stop_loss: float = 1e-2
    project_out: int = 32
    replay: int = 0
    live_threshold: bool = True
    templates: TemplateHparams = field(default_factory=_wise_templates)
    irrelevant: IrrelevantHparams = field(default_factory=IrrelevantHparams)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer < 0 or self.num_steps < 1:
            raise ValueError(f"layer must be >= 0 and num_steps >= 1, got layer={self.layer} num_steps={self.num_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.beta <= self.alpha:
            raise ValueError(f"margins must be >= 0 with beta > alpha, got alpha={self.alpha} beta={self.beta} "
                             f"gamma={self.gamma}")
        if not (self.margin_weight >= 0 and math.isfinite(self.margin_weight)):
            raise ValueError(f"margin_weight must be a finite number >= 0, got {self.margin_weight}")
        if not 0 < self.act_ratio <= 1 or not 0 < self.mask_ratio <= 1 or not 0 < self.merge_density <= 1:
            raise ValueError(f"act_ratio, mask_ratio and merge_density must be in (0, 1], got {self.act_ratio}, "
                             f"{self.mask_ratio}, {self.merge_density}")
        if self.project_out < 0:
            raise ValueError(f"project_out must be >= 0, got {self.project_out}")
        if self.replay < 0:
            raise ValueError(f"replay must be >= 0, got {self.replay}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be None or > 0, got {self.norm_constraint}")
        if self.shard_size < 1 or self.merge_every < self.shard_size or self.merge_every % self.shard_size:
            raise ValueError(f"merge_every must be a positive multiple of shard_size >= 1, got shard_size="
                             f"{self.shard_size} merge_every={self.merge_every}")


# ----------------------------------------------------------------------------------------------
# the irrelevant pool


def load_irrelevant(cfg: IrrelevantHparams) -> list[str]:
    """The irrelevant texts ``cfg`` names (``IrrelevantHparams``).

    Raises:
        FileNotFoundError: ``cfg.path`` does not exist.
        ValueError: an unreadable record (named by its index), or an empty pool.
    """
    path = Path(cfg.path).expanduser() if cfg.path else DEFAULT_IRRELEVANT
    if not path.is_file():
        raise FileNotFoundError(f"wise: irrelevant.path {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if cfg.path is None:  # the corpus is paragraphs: one sentence per text
            lines = [s.strip() for ln in lines for s in re.split(r"(?<=[.!?])\s+", ln) if s.strip()]
        records: list[Any] = lines
    elif path.suffix == ".jsonl":
        records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"wise: irrelevant.path {str(path)!r} must hold a JSON array")
    out = [_irrelevant_text(r, path, i) for i, r in enumerate(records)]
    out = out[cfg.offset:None if cfg.limit is None else cfg.offset + cfg.limit]
    if not out:
        raise ValueError(f"wise: no irrelevant texts in {str(path)!r} (offset {cfg.offset}, limit {cfg.limit})")
    return out


def _irrelevant_text(record: Any, path: Path, index: int) -> str:
    if isinstance(record, str) and record.strip():
        return record.strip()
    if isinstance(record, dict):
        for prompt, answer in (("loc", "loc_ans"), ("locality_prompt", "locality_ground_truth")):
            if isinstance(record.get(prompt), str) and isinstance(record.get(answer), str):
                return f"{record[prompt].strip()} {record[answer].strip()}"
    raise ValueError(f"wise: irrelevant.path {str(path)!r} record {index}: expected a text, a zsRE record "
                     "(loc, loc_ans) or a CounterFact record (locality_prompt, locality_ground_truth)")


# ----------------------------------------------------------------------------------------------
# the algorithm


@register("wise")
class Wise(EditAlgorithm):
    """WISE: the side memory is this instance's memory (``memory_state``); ``attach`` puts the routing hook on."""

    Hparams = WiseHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.memory = SideMemory()
        self._templates = TemplateCache()
        self._irrelevant: Optional[list[str]] = None
        self._basis: Optional[torch.Tensor] = None  # project_out's basis, from the base model
        self._installed = Installation()

    # -- base-model quantities -----------------------------------------------------------------
    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Context templates from the base model, the irrelevant pool and, with ``project_out``, the
        activation basis of that pool (idempotent; the projection's input never depends on Δ)."""
        module, _, _ = projection(model, self.hparams.layer)
        t = self.hparams.templates
        self._templates.get(model, tok, t.length_params, t.seed)
        if self._irrelevant is None:
            self._irrelevant = load_irrelevant(self.hparams.irrelevant)
        if self.hparams.project_out and self._basis is None:
            self._basis = activation_basis(model, tok, module, self._irrelevant, self.hparams.project_out)

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return set()  # no parameter is written: the memory lives in the side memory

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        hp = self.hparams
        if not requests:
            return EditReport()
        self.prepare(model, tok)
        self.detach(model)  # training adds Δ itself; the routed memory must not answer as well
        try:
            info = self._train(model, tok, requests)
        finally:
            self.attach(model)
        mem = self.memory
        losses = {k: info.pop(k) for k in ("loss_first", "loss_final", "nll_final")}
        info.update(shards=len(mem.memories()), threshold=hp.act_ratio * min(m.min_score for m in mem.memories()))
        return EditReport(seconds=time.perf_counter() - t0, losses=losses, info=info)

    def _train(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> dict[str, float]:
        """One batch into the active shard (a new shard first when it is full), then merge when due."""
        hp, mem = self.hparams, self.memory
        module, weight, transposed = projection(model, hp.layer)
        if mem.active is None or mem.active.edits >= hp.shard_size:
            mem.start_shard(weight.detach())
        mask = gradient_mask(weight.shape, hp.mask_ratio, hp.seed * 1_000_003 + mem.shards_started)
        pool, k = self._irrelevant, mem.edits_total * hp.irrelevant.per_edit
        irrelevant = [pool[(k + j) % len(pool)] for j in range(hp.irrelevant.per_edit * len(requests))]
        t = hp.templates
        templates = self._templates.get(model, tok, t.length_params, t.seed)
        hook = WiseHook(mem, transposed, hp.act_ratio)
        with seeded(hp.seed, weight.device):
            info = train_shard(model, tok, hook, module, mem.active, mask, requests, templates, irrelevant, hp,
                               self._basis)
        mem.edits_total += len(requests)
        if sum(m.edits for m in mem.pending) + mem.active.edits >= hp.merge_every:
            mem.merge(hp.merge_density, hp.retrieve)
            if hp.live_threshold:  # only the memory just merged (always the last) has a new Δ
                newest = mem.merged[-1]
                newest.min_score = float(stored_scores(newest, newest.delta, transposed).min())
        return info

    def reset_state(self) -> None:
        """Forget every edit (the memory is not detached here: the Editor does that)."""
        self._set_memory(SideMemory())

    def _set_memory(self, memory: SideMemory) -> None:
        """Change the memory in place, so an attached hook (which holds ``self.memory``) sees the new one."""
        for name in ("active", "pending", "merged", "shards_started", "edits_total"):
            setattr(self.memory, name, getattr(memory, name))

    # -- memory (structural edit) ----------------------------------------------------------------
    def memory_state(self) -> MemoryState:
        """The side memory: each memory's Δ as a tensor; counts, scores and the layer as structure.

        Empty (``MemoryState()``) when no edit is held, as the contract requires after a restore.
        """
        mem = self.memory
        if mem.empty() and mem.shards_started == 0 and mem.edits_total == 0:
            return MemoryState()
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for kind, group in (("merged", mem.merged), ("pending", mem.pending),
                            ("active", [mem.active] if mem.active is not None else [])):
            for i, m in enumerate(group):
                tensors[f"{kind}.{i}"] = m.delta
                entry = {"kind": kind, "index": i, "edits": m.edits, "min_score": m.min_score}
                if m.keys is not None and m.key_mask is not None:  # replay / live_threshold's edit rows
                    tensors[f"{kind}.{i}.keys"], tensors[f"{kind}.{i}.key_mask"] = m.keys, m.key_mask
                    entry["keys"] = True
                entries.append(entry)
        structure = {"layer": self.hparams.layer, "shards_started": mem.shards_started,
                     "edits_total": mem.edits_total, "memories": entries}
        return MemoryState(tensors, structure)

    def load_memory(self, state: MemoryState) -> None:
        """Replace the side memory by ``state`` (not attached).

        Raises:
            AlgorithmError: a memory of another layer, or tensors and structure that do not match.
        """
        if state.empty:
            self._set_memory(SideMemory())
            return
        s = state.structure
        if s.get("layer") != self.hparams.layer:
            raise AlgorithmError(f"wise: the memory was trained at layer {s.get('layer')}, this instance edits "
                                 f"layer {self.hparams.layer}")
        flat: dict[str, torch.Tensor] = {"shards_started": torch.tensor(int(s["shards_started"])),
                                         "edits_total": torch.tensor(int(s["edits_total"]))}
        names = set()
        for e in s.get("memories", []):
            key = f"{e['kind']}.{e['index']}"
            if key not in state.tensors:
                raise AlgorithmError(f"wise: the memory's structure names {key!r} but it has no such tensor")
            names.add(key)
            flat[f"{key}.delta"] = state.tensors[key]
            if e.get("keys"):
                for part in ("keys", "key_mask"):
                    if f"{key}.{part}" not in state.tensors:
                        raise AlgorithmError(f"wise: the memory's structure names {key}.{part} but it has no such tensor")
                    names.add(f"{key}.{part}")
                    flat[f"{key}.{part}"] = state.tensors[f"{key}.{part}"]
            flat[f"{key}.edits"] = torch.tensor(int(e["edits"]))
            flat[f"{key}.min_score"] = torch.tensor(float(e["min_score"]), dtype=torch.float64)
        extra = sorted(set(state.tensors) - names)
        if extra:
            raise AlgorithmError(f"wise: memory tensors {extra} are not in its structure")
        try:
            self._set_memory(SideMemory.from_state(flat))
        except ValueError as exc:
            raise AlgorithmError(str(exc)) from exc

    def attach(self, model: nn.Module) -> None:
        """Install the routing hook on the projection (no-op when the memory is empty or it is installed)."""
        if self._installed or self.memory.empty():
            return
        module, _, transposed = projection(model, self.hparams.layer)
        name = model_spec(model).mlp_out.format(self.hparams.layer)
        self._installed.hook(model, name, WiseHook(self.memory, transposed, self.hparams.act_ratio,
                                                   self.hparams.relative_routing))

    def detach(self, model: nn.Module) -> None:
        self._installed.remove()
        self._installed = Installation()
