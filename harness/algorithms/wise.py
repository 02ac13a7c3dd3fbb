"""``wise``: lifelong editing with a side memory and routing (Wang et al., NeurIPS 2024, "WISE: Rethinking
the Knowledge Memory for Lifelong Model Editing of Large Language Models"), docs/algorithms/wise.md.

The main memory (every weight of the model) is never written. Edits go to a side memory: a copy of
one layer's FFN down projection, kept as ``Δ = W' - W`` (``wise_memory``), consulted through a
forward hook on that projection (``wise_memory.WiseHook``): at each position the output is the main memory's,
or, where the activation score ``||A(x) Δᵀ||`` (running mean over the tokens so far) exceeds the
memory's threshold ε, the side memory's.

Training one batch of edits (``train_shard``; EasyEdit's ``WISE.edit``, written anew):
* rows: every context template (``templates``, sampled from the base model) around each request's
  prompt + target, plus ``irrelevant.per_edit`` irrelevant texts per request (the reference takes
  zsRE *train* records' ``loc + " " + loc_ans``; see ``IrrelevantHparams``); the forward adds
  ``A(x) Δᵀ`` on every row;
* loss: the target NLL of the template rows plus the paper's margin losses on the running-mean
  scores ``s``: ``[α - ... ]`` as ``mean⁺(s_irr - α) + mean⁺(β - s_edit) + mean⁺(γ - (s_edit - max s_irr))``
  (``mean⁺``: mean over the violating entries, as the reference); ``s_edit`` is read at the
  positions whose logits predict target tokens, ``s_irr`` at every token of the irrelevant rows;
* SGD on Δ with the shard's random gradient mask (ratio ρ), Δ clamped to ``±norm_constraint``;
  stops early when the loss falls below ``early_stop_loss``;
* afterwards each request's score (the smallest running mean over its target-predicting positions,
  over its template rows) updates the shard's ``min_score``; ε = ``act_ratio · min_score``.

Sharding and merging: a new shard (fresh Δ, fresh mask) starts every ``shard_size`` edits; every
``merge_every`` edits the shards are TIES-merged (``merge_density``) into the side memory, or, with
``retrieve``, into one more side memory among which routing picks the highest score.

Deviations from the reference, each for a reason: routing per position by the running mean (the
harness batches right-padded inputs; module docstring of ``wise_memory``); no SGD weight decay (in
the reference it shrinks every entry of W' towards zero, masked or not); the NLL is read on the
target tokens only (the reference's ``only_label`` mask starts one token early).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import AlgorithmError, EditAlgorithm
from harness.algorithms.batches import TargetBatch
from harness.algorithms.finetune import seeded, trainable
from harness.algorithms.hooks import Hooks, StopForward, hidden_of, logit_head, run_to_stop
from harness.algorithms.locate import TemplateCache, TemplateHparams, fill_template
from harness.algorithms.wise_memory import Memory, SideMemory, WiseHook, gradient_mask, running_mean
from harness.models import get_module, model_spec, num_layers
from harness.tokens import encode_pairs, pad_batch, pad_id
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)

DEFAULT_IRRELEVANT = Path(__file__).resolve().parents[1] / "data" / "samples" / "capability-corpus.txt"


def _wise_templates() -> TemplateHparams:
    return TemplateHparams(length_params=[[5, 5], [10, 5]])  # EasyEdit's wise_main: 1 + 5 + 5 rows


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
        act_ratio: ε = act_ratio · the smallest edit score of a memory.
        mask_ratio: ρ, the fraction of Δ's entries a shard may train.
        norm_constraint: Δ's entries are clamped to ±this; None: no clamp.
        shard_size: edits per shard (``save_freq``).
        merge_every: edits per merge of the shards (``merge_freq``); a multiple of shard_size.
        merge_density: TIES trim density (``densities``).
        retrieve: keep one merged memory per merge period and route to the highest score (WISE-Retrieve).
        early_stop_loss: stop a batch's training once its total loss is below this.
        templates: context templates around the prompt (sampled from the base model in ``prepare``).
        irrelevant: the irrelevant inputs of the margin loss.
        seed: seeds the gradient masks (with the shard's index).
    """

    layer: int = 24
    num_steps: int = 40
    lr: float = 1.0
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    mask_ratio: float = 0.2
    norm_constraint: Optional[float] = 1.0
    shard_size: int = 500
    merge_every: int = 1000
    merge_density: float = 0.53
    retrieve: bool = False
    early_stop_loss: float = 1e-2
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
        if not 0 < self.act_ratio <= 1 or not 0 < self.mask_ratio <= 1 or not 0 < self.merge_density <= 1:
            raise ValueError(f"act_ratio, mask_ratio and merge_density must be in (0, 1], got {self.act_ratio}, "
                             f"{self.mask_ratio}, {self.merge_density}")
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
# the projection and one batch of training


def projection(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Parameter, bool]:
    """The MLP output projection at ``layer``, its weight, and whether the weight is stored transposed.

    Raises:
        AlgorithmError: ``layer`` out of range.
    """
    spec = model_spec(model)
    try:
        module = get_module(model, spec.mlp_out.format(layer))
    except (AttributeError, IndexError, KeyError) as exc:
        raise AlgorithmError(f"wise: layer {layer} has no MLP output projection {spec.mlp_out.format(layer)!r}") from exc
    return module, module.weight, spec.out_transposed


# ----------------------------------------------------------------------------------------------
# training one batch of edits


def _rows(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str], irrelevant: Sequence[str],
          device: torch.device) -> tuple[TargetBatch, torch.Tensor, torch.Tensor, int]:
    """One right-padded batch: template rows of every request, then the irrelevant rows.

    Returns:
        (batch, decide [B, L] bool: positions predicting a target token (template rows) or any real
        token (irrelevant rows), owner [n_template_rows]: the request of each template row,
        n_template_rows).
    """
    pairs = [(fill_template(t, r.rewrite_prompt), r.target_new) for r in requests for t in templates]
    owner = torch.tensor([i for i in range(len(requests)) for _ in templates])
    items = encode_pairs(tok, pairs)
    irr_ids = [list(ids) for ids in tok(list(irrelevant))["input_ids"]]
    seqs = [list(it.ids) for it in items] + irr_ids
    ids, attn = pad_batch(seqs, pad_id(tok))
    labels, _ = pad_batch([[0] * len(it.prompt_ids) + [1] * len(it.target_ids) for it in items]
                          + [[0] * len(s) for s in irr_ids], 0, width=ids.shape[1])
    labels = labels.bool()
    decide = torch.zeros_like(labels)
    decide[:, :-1] = labels[:, 1:]
    decide[len(items):] = attn[len(items):].bool()
    batch = TargetBatch(ids.to(device), attn.to(device), labels.to(device))
    return batch, decide.to(device), owner.to(device), len(items)


def _mean_violation(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``x`` (0 when none): the reference's hinge averaging."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def margin_loss(run_mean: torch.Tensor, decide: torch.Tensor, n_edit: int, alpha: float, beta: float,
                gamma: float) -> torch.Tensor:
    """The paper's routing margins on running-mean scores [B, L] (edit rows first, ``n_edit`` of them)."""
    s_edit = run_mean[:n_edit][decide[:n_edit]]
    s_irr = run_mean[n_edit:][decide[n_edit:]]
    loss = _mean_violation(beta - s_edit)
    if s_irr.numel():
        loss = loss + _mean_violation(s_irr - alpha) + _mean_violation(gamma - (s_edit - s_irr.max()))
    return loss


class UpperForward:
    """The logits of a fixed batch computed from block ``layer`` up: the blocks below do not depend on
    the side memory, so their output is computed once (``docs/algorithms/wise.md``, cost).

    The first call is checked against the whole model's forward; where they differ (an architecture
    whose blocks need more than the hidden states and the keyword arguments every block gets), every
    call runs the whole model instead.
    """

    def __init__(self, model: nn.Module, batch: TargetBatch, layer: int) -> None:
        spec = model_spec(model)
        self.model, self.batch = model, batch
        self.blocks = [get_module(model, spec.layer.format(i)) for i in range(layer, num_layers(model))]
        self.head = logit_head(model, spec)
        seen: list[tuple[tuple, dict[str, Any]]] = []

        def grab(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen.append((args, kwargs))
            raise StopForward

        with torch.no_grad(), Hooks() as hooks:
            hooks.input(self.blocks[0], grab)
            run_to_stop(model, **self._inputs())
        self.args, self.kwargs = seen[0] if seen else ((), {})
        self.checked = self.fast = bool(seen)

    def _inputs(self) -> dict[str, Any]:
        return dict(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The logits at positions ``(rows[k], cols[k])`` only ([K, vocab]): the unembedding of every
        position would cost more than the blocks above a late layer."""
        if not self.fast:
            return self.model(**self._inputs()).logits[rows, cols]
        h = self.args[0]
        for block in self.blocks:
            h = hidden_of(block(h, *self.args[1:], **self.kwargs))
        logits = self.head(h[rows, cols])
        if self.checked:
            self.checked = False
            with torch.no_grad():
                full = self.model(**self._inputs()).logits[rows, cols]
            if not torch.allclose(logits.detach(), full, rtol=1e-4, atol=1e-4):
                log.warning("wise: the forward from block %d differs from the whole model's (max %.3g); "
                            "running the whole model each step", len(self.blocks),
                            float((logits.detach() - full).abs().max()))
                self.fast = False
                return self.model(**self._inputs()).logits[rows, cols]
        return logits


def target_positions_nll(logits: torch.Tensor, batch: TargetBatch, rows: torch.Tensor,
                         cols: torch.Tensor) -> torch.Tensor:
    """``batches.target_nll`` averaged over the rows, from the logits at the positions that predict
    target tokens only (``rows``, ``cols``: those positions; the gold token is the next one)."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    tok_nll = -logp.gather(-1, batch.input_ids[rows, cols + 1].unsqueeze(-1)).squeeze(-1)
    n_rows = batch.input_ids.shape[0]
    total = torch.zeros(n_rows, device=logits.device).index_add(0, rows, tok_nll)
    count = torch.zeros(n_rows, device=logits.device).index_add(0, rows, torch.ones_like(tok_nll))
    return (total / count).mean()


def train_shard(model: nn.Module, tok: Any, hook: WiseHook, module: nn.Module, memory: Memory, mask: torch.Tensor,
                requests: Sequence[EditRequest], templates: Sequence[str], irrelevant: Sequence[str],
                hp: WiseHparams) -> dict[str, float]:
    """Train ``memory.delta`` on ``requests`` (out of place) and update its edits and ``min_score``.

    Returns:
        Losses and scores for the report (``loss_first``, ``loss_final``, ``nll_final``, ``steps``,
        ``edit_score_min``, ``irrelevant_score_max``).

    Raises:
        AlgorithmError: a non-finite loss.
    """
    device = memory.delta.device
    batch, decide, owner, n_edit = _rows(tok, requests, templates, irrelevant, device)
    edit = TargetBatch(batch.input_ids[:n_edit], batch.attention_mask[:n_edit], batch.label_mask[:n_edit])
    delta = memory.delta.clone().requires_grad_(True)
    mask = mask.to(device)
    losses: list[float] = []
    nll = torch.zeros(())
    with Hooks() as hooks, trainable(model, []), torch.enable_grad():
        hooks.output(module, hook)
        hook.training = delta
        try:
            forward = UpperForward(model, batch, hp.layer)
            rows, cols = decide[:n_edit].nonzero(as_tuple=True)
            for _ in range(hp.num_steps):
                nll = target_positions_nll(forward(rows, cols), edit, rows, cols)
                loss = nll + margin_loss(running_mean(hook.scores), decide, n_edit, hp.alpha, hp.beta, hp.gamma)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise AlgorithmError(f"wise: non-finite loss at step {len(losses) - 1}")
                if losses[-1] < hp.early_stop_loss:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                with torch.no_grad():
                    delta -= hp.lr * grad * mask
                    if hp.norm_constraint is not None:
                        delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
            with torch.no_grad():
                forward(rows[:1], cols[:1])
                run_mean = running_mean(hook.scores)
        finally:
            hook.training, hook.scores = None, None
    at = torch.where(decide[:n_edit], run_mean[:n_edit], torch.full_like(run_mean[:n_edit], torch.inf)).amin(1)
    per_request = torch.full((len(requests),), torch.inf, device=device).scatter_reduce(0, owner, at, "amin")
    irr = run_mean[n_edit:][decide[n_edit:]]
    memory.delta = delta.detach()
    memory.edits += len(requests)
    memory.min_score = min(memory.min_score, float(per_request.min()))
    return {"loss_first": losses[0], "loss_final": losses[-1], "nll_final": float(nll.detach()),
            "steps": float(len(losses)), "edit_score_min": float(per_request.min()),
            "irrelevant_score_max": float(irr.max()) if irr.numel() else 0.0, "fast_forward": float(forward.fast)}


# ----------------------------------------------------------------------------------------------
# the algorithm


class Wise(EditAlgorithm):
    """WISE: the side memory is this instance's state; the hook on the projection reads it."""

    Hparams = WiseHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.memory = SideMemory()
        self._templates = TemplateCache()
        self._irrelevant: Optional[list[str]] = None

    # -- base-model quantities -----------------------------------------------------------------
    def prepare(self, model: nn.Module, tok: Any) -> None:
        """Context templates from the base model and the irrelevant pool (idempotent)."""
        projection(model, self.hparams.layer)
        t = self.hparams.templates
        self._templates.get(model, tok, t.length_params, t.seed)
        if self._irrelevant is None:
            self._irrelevant = load_irrelevant(self.hparams.irrelevant)

    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        return set()  # no parameter is written: the memory lives in the side memory

    def hook(self, model: nn.Module) -> tuple[nn.Module, WiseHook]:
        """The projection the side memory sits on and a hook reading this instance's memory."""
        module, _, transposed = projection(model, self.hparams.layer)
        return module, WiseHook(self.memory, transposed, self.hparams.act_ratio)

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t0 = time.perf_counter()
        hp = self.hparams
        if not requests:
            return EditReport()
        self.prepare(model, tok)
        module, weight, transposed = projection(model, hp.layer)
        mem = self.memory
        if mem.active is None or mem.active.edits >= hp.shard_size:
            mem.start_shard(weight.detach())
        mask = gradient_mask(weight.shape, hp.mask_ratio, hp.seed * 1_000_003 + mem.shards_started)
        pool, k = self._irrelevant, mem.edits_total * hp.irrelevant.per_edit
        irrelevant = [pool[(k + j) % len(pool)] for j in range(hp.irrelevant.per_edit * len(requests))]
        t = hp.templates
        templates = self._templates.get(model, tok, t.length_params, t.seed)
        hook = WiseHook(mem, transposed, hp.act_ratio)
        with seeded(hp.seed, weight.device):
            info = train_shard(model, tok, hook, module, mem.active, mask, requests, templates, irrelevant, hp)
        mem.edits_total += len(requests)
        if sum(m.edits for m in mem.pending) + mem.active.edits >= hp.merge_every:
            mem.merge(hp.merge_density, hp.retrieve)
        losses = {k: info.pop(k) for k in ("loss_first", "loss_final", "nll_final")}
        info.update(shards=len(mem.memories()), threshold=hp.act_ratio * min(m.min_score for m in mem.memories()))
        return EditReport(seconds=time.perf_counter() - t0, losses=losses, info=info)

    # -- explicit state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the whole side memory (deltas stay on the device they were saved from).

        Raises:
            AlgorithmError: an entry that is not part of a WISE memory.
        """
        try:
            restored = SideMemory.from_state(state)
        except ValueError as exc:
            raise AlgorithmError(str(exc)) from exc
        self._set_memory(restored)

    def reset_state(self) -> None:
        self._set_memory(SideMemory())

    def _set_memory(self, memory: SideMemory) -> None:
        """Change the memory in place, so hooks holding ``self.memory`` see the new one."""
        for name in ("active", "pending", "merged", "shards_started", "edits_total"):
            setattr(self.memory, name, getattr(memory, name))
