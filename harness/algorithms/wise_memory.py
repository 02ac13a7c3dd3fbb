"""WISE's side memory (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong
Model Editing of Large Language Models"), docs/algorithms/wise.md: the tensor pieces, no model.

The side memory is a copy W' of one FFN value matrix W (an MLP down projection). It is kept here as
the difference ``Δ = W' - W`` (float32, in the parameter's layout), so that

* the side memory's output is ``main_out + A(x) Δᵀ`` (``side_delta``), and
* the paper's activation score ``||A(x) (W' - W)||`` (its routing Eq.) is the norm of that same
  term, per token (``token_scores``): the main memory W itself is never copied or written.

Routing. The paper compares one score per input with a threshold ε. A forward inside the harness
sees right-padded batches and no attention mask at the projection, so a position's score is the
*running mean* of the token scores up to and including it (``running_mean``): under causal
attention nothing at a position depends on later tokens or on the padding, and at the last token of
an unpadded input it is the paper's mean over the sequence. A position goes to the memory with the
highest score among those whose score exceeds their own threshold, otherwise to the main memory
(``route``; with one memory this is the paper's ``score > ε`` rule).

Knowledge sharding. Each shard of edits trains its own Δ under a random gradient mask keeping a
fraction ``ρ`` of the entries (``gradient_mask``, seeded per shard so a resumed run draws the same
mask); shards are merged into one side memory by TIES merging (Yadav et al., NeurIPS 2023):
trim each task vector to its largest-magnitude ``density`` fraction, elect a sign per entry (the
sign of the weighted sum), and average, per entry, only the shards that agree with it
(``ties_merge``). The bookkeeping of shards and merges is ``SideMemory``; its whole state is a flat
dict of tensors (``state_dict``) for the Editor's snapshots and checkpoints.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------------
# pure functions


def side_delta(x: torch.Tensor, delta: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``A(x) Δᵀ``: what the side memory adds to the projection's output, in float32.

    Args:
        x: [..., d_in] the projection's input (the FFN activation A(x)).
        delta: ``W' - W`` in the parameter's layout: [d_out, d_in] (``nn.Linear``) or [d_in, d_out]
            when ``transposed`` (GPT-2's Conv1D).
        transposed: the parameter stores Wᵀ.

    Returns:
        [..., d_out] float32.
    """
    x, delta = x.to(torch.float32), delta.to(x.device)
    return x @ delta if transposed else F.linear(x, delta)


def token_scores(added: torch.Tensor) -> torch.Tensor:
    """The activation score of every token: ``||A(x) Δᵀ||₂`` over the last dim ([..., L, d] -> [..., L])."""
    return torch.linalg.vector_norm(added, dim=-1)


def running_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean of ``scores`` [..., L] over positions ``0..t`` at every position ``t`` (causal, padding-free)."""
    steps = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=scores.dtype)
    return scores.cumsum(-1) / steps


def route(scores: torch.Tensor, thresholds: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Which memory answers at each position.

    Args:
        scores: [M, ...] running-mean scores of M side memories.
        thresholds: [M] each memory's ε.
        relative: rank the passing memories by ``score / ε`` instead of the score (``relative_routing``
            in ``wise.WiseHparams``): memories of different scales compete on how far each is above its
            own threshold.

    Returns:
        [...] int64: the index of the memory with the highest score (or score / ε) among those whose
        score exceeds their threshold (strictly), or -1 (the main memory) where none does.
    """
    eps = thresholds.to(scores.dtype).reshape(-1, *([1] * (scores.dim() - 1)))
    passing = scores > eps
    rank = scores / eps.clamp_min(torch.finfo(scores.dtype).tiny) if relative else scores
    best = torch.where(passing, rank, torch.full_like(scores, -torch.inf)).argmax(0)
    return torch.where(passing.any(0), best, torch.full_like(best, -1))


def gradient_mask(shape: Sequence[int], ratio: float, seed: int) -> torch.Tensor:
    """A random 0/1 mask (float32, CPU) keeping each entry with probability ``ratio``, seeded."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand(tuple(shape), generator=gen) < ratio).to(torch.float32)


def trim(task: torch.Tensor, density: float) -> torch.Tensor:
    """``task`` with all but its ``ceil(density · numel)`` largest-magnitude entries set to zero (ties kept)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = max(1, int(round(density * task.numel())))
    if k >= task.numel():
        return task.clone()
    cut = task.abs().flatten().kthvalue(task.numel() - k + 1).values
    return torch.where(task.abs() >= cut, task, torch.zeros_like(task))


def ties_merge(tasks: Sequence[torch.Tensor], density: float, weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES merging of task vectors (here: side-memory deltas ``W'_i - W``) into one.

    Trim each to its top ``density`` fraction by magnitude; elect per entry the sign of the weighted
    sum of the trimmed vectors; merge per entry as the weighted mean of the trimmed values whose sign
    agrees with the elected one (zero where none agrees).

    Args:
        tasks: the deltas, all of one shape.
        density: fraction of entries each delta keeps (EasyEdit's ``densities``).
        weights: one positive weight per delta (default 1 each).

    Returns:
        The merged delta, float32.

    Raises:
        ValueError: no tasks, mismatched shapes or weights, a non-positive weight.
    """
    if not tasks:
        raise ValueError("ties_merge needs at least one task vector")
    weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
    if len(weights) != len(tasks) or any(not w > 0 for w in weights):
        raise ValueError(f"need one positive weight per task vector, got {weights} for {len(tasks)}")
    if any(t.shape != tasks[0].shape for t in tasks):
        raise ValueError(f"task vectors differ in shape: {[tuple(t.shape) for t in tasks]}")
    trimmed = torch.stack([w * trim(t.to(torch.float32), density) for t, w in zip(tasks, weights)])
    w = torch.tensor(weights, dtype=torch.float32, device=trimmed.device).reshape(-1, *([1] * tasks[0].dim()))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    norm = (w * agree).sum(0)
    return torch.where(norm > 0, total / norm.clamp_min(1e-30), torch.zeros_like(total))


# ----------------------------------------------------------------------------------------------
# the memory's bookkeeping


@dataclass
class Memory:
    """One side memory: its delta, how many edits it holds, and the weakest edit score it learnt.

    The threshold ε is ``act_ratio · min_score`` (EasyEdit: the smallest mean activation of its edits,
    times ``act_ratio``).
    """

    delta: torch.Tensor
    edits: int = 0
    min_score: float = float("inf")
    keys: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None

    def add_keys(self, keys: torch.Tensor, mask: torch.Tensor) -> None:
        """Append edit rows' activations ``keys`` [R, L, d_in] and their scored positions ``mask`` [R, L]
        (``replay`` in ``wise.WiseHparams``); rows are right-padded to the longest kept row."""
        keys, mask = keys.detach().to(torch.float32), mask.detach().bool()
        if self.keys is None or self.key_mask is None:
            self.keys, self.key_mask = keys.clone(), mask.clone()
            return
        width = max(self.keys.shape[1], keys.shape[1])
        self.keys = torch.cat([F.pad(self.keys, (0, 0, 0, width - self.keys.shape[1])),
                               F.pad(keys, (0, 0, 0, width - keys.shape[1]))])
        self.key_mask = torch.cat([F.pad(self.key_mask, (0, width - self.key_mask.shape[1])),
                                   F.pad(mask, (0, width - mask.shape[1]))])


def stored_scores(memory: Memory, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The current score of each stored edit row of ``memory`` under ``delta``: the smallest running mean
    over its scored positions (the edit score WISE's ε is taken from). [R] float32; empty without keys."""
    if memory.keys is None or memory.key_mask is None:
        return torch.zeros(0)
    run = running_mean(token_scores(side_delta(memory.keys, delta, transposed)))
    return torch.where(memory.key_mask.to(run.device), run, torch.full_like(run, torch.inf)).amin(1)


@dataclass
class SideMemory:
    """The shards and merged memories of one WISE side memory (module docstring).

    Attributes:
        active: the shard being trained (None before the first edit).
        pending: finished shards waiting for the next merge.
        merged: consolidated memories: one in merge mode, one per merge period in retrieval mode.
        shards_started: how many shards were started (seeds each shard's gradient mask).
        edits_total: edits applied so far (picks the irrelevant samples of the next edit).
    """

    active: Memory | None = None
    pending: list[Memory] = field(default_factory=list)
    merged: list[Memory] = field(default_factory=list)
    shards_started: int = 0
    edits_total: int = 0

    def memories(self) -> list[Memory]:
        """Every memory that answers at inference: merged ones, pending shards, the active shard."""
        active = [self.active] if self.active is not None and self.active.edits > 0 else []
        return [*self.merged, *self.pending, *active]

    def empty(self) -> bool:
        return not self.memories()

    def start_shard(self, like: torch.Tensor) -> Memory:
        """A fresh active shard (zero delta shaped and placed like ``like``); the old one becomes pending."""
        if self.active is not None and self.active.edits > 0:
            self.pending.append(self.active)
        self.active = Memory(torch.zeros_like(like, dtype=torch.float32))
        self.shards_started += 1
        return self.active

    def merge(self, density: float, retrieve: bool) -> None:
        """TIES-merge the pending shards (the active one included): into the one merged memory, or, in
        retrieval mode, into a new merged memory of their own. Weights: the edits each holds."""
        if self.active is not None and self.active.edits > 0:
            self.pending.append(self.active)
        self.active = None
        group = self.pending if retrieve else [*self.merged, *self.pending]
        if not group:
            return
        delta = group[0].delta if len(group) == 1 else ties_merge([m.delta for m in group], density,
                                                                   [m.edits for m in group])
        memory = Memory(delta, sum(m.edits for m in group), min(m.min_score for m in group))
        if all(m.keys is not None for m in group):  # replay: the merged memory keeps every edit's rows
            for m in group:
                memory.add_keys(m.keys, m.key_mask)
        self.merged = [*self.merged, memory] if retrieve else [memory]
        self.pending = []

    # -- tensors only, for snapshots and checkpoints ---------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"shards_started": torch.tensor(self.shards_started), "edits_total": torch.tensor(self.edits_total)}
        named = [("merged", i, m) for i, m in enumerate(self.merged)]
        named += [("pending", i, m) for i, m in enumerate(self.pending)]
        named += [("active", 0, self.active)] if self.active is not None else []
        for kind, i, m in named:
            out[f"{kind}.{i}.delta"] = m.delta
            out[f"{kind}.{i}.edits"] = torch.tensor(m.edits)
            out[f"{kind}.{i}.min_score"] = torch.tensor(m.min_score, dtype=torch.float64)
            if m.keys is not None and m.key_mask is not None:
                out[f"{kind}.{i}.keys"], out[f"{kind}.{i}.key_mask"] = m.keys, m.key_mask
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], device: torch.device | None = None) -> SideMemory:
        """Rebuild from ``state_dict()`` (tensors copied; deltas moved to ``device`` when given).

        Raises:
            ValueError: an unexpected key or a memory missing one of its three tensors.
        """
        groups: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key in ("shards_started", "edits_total"):
                continue
            kind, _, rest = key.partition(".")
            index, _, part = rest.partition(".")
            if kind not in ("merged", "pending", "active") or not index.isdigit() or part not in (
                    "delta", "edits", "min_score", "keys", "key_mask"):
                raise ValueError(f"wise: unexpected state entry {key!r}")
            groups.setdefault((kind, int(index)), {})[part] = value
        built: dict[str, dict[int, Memory]] = {"merged": {}, "pending": {}, "active": {}}
        for (kind, index), parts in groups.items():
            need = {"delta", "edits", "min_score"}
            if "keys" in parts or "key_mask" in parts:  # replay's stored rows come as a pair
                need |= {"keys", "key_mask"}
            if set(parts) != need:
                raise ValueError(f"wise: state of {kind}.{index} lacks {sorted(need - set(parts))}")
            dev = device or parts["delta"].device
            delta = parts["delta"].detach().to(device=dev, dtype=torch.float32, copy=True)
            memory = Memory(delta, int(parts["edits"]), float(parts["min_score"]))
            if "keys" in parts:
                memory.keys = parts["keys"].detach().to(device=dev, dtype=torch.float32, copy=True)
                memory.key_mask = parts["key_mask"].detach().to(device=dev, dtype=torch.bool, copy=True)
            built[kind][index] = memory
        return cls(active=built["active"].get(0),
                   pending=[built["pending"][i] for i in sorted(built["pending"])],
                   merged=[built["merged"][i] for i in sorted(built["merged"])],
                   shards_started=int(state.get("shards_started", torch.tensor(0))),
                   edits_total=int(state.get("edits_total", torch.tensor(0))))


# ----------------------------------------------------------------------------------------------
# the hook on the projection


class WiseHook:
    """Forward hook on the edited projection: adds the routed side memory's output (``route``).

    With ``training`` set (a delta that requires grad), every position gets ``A(x) Δᵀ``; the token
    scores are kept in ``scores`` for the margin loss and the inputs ``A(x)`` in ``inputs``. Positions routed to the main memory keep the
    projection's own output bit for bit; with no memory at all the hook changes nothing.
    """

    def __init__(self, memory: SideMemory, transposed: bool, act_ratio: float, relative: bool = False) -> None:
        self.memory, self.transposed, self.act_ratio, self.relative = memory, transposed, act_ratio, relative
        self.training: Optional[torch.Tensor] = None
        self.scores: Optional[torch.Tensor] = None
        self.inputs: Optional[torch.Tensor] = None

    def __call__(self, _module: nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        x = args[0]
        if self.training is not None:
            added = side_delta(x, self.training, self.transposed)
            self.scores, self.inputs = token_scores(added), x.detach()
            return (out.to(torch.float32) + added).to(out.dtype)
        memories = self.memory.memories()
        if not memories:
            return None
        adds = [side_delta(x, m.delta, self.transposed) for m in memories]
        scores = torch.stack([running_mean(token_scores(a)) for a in adds])
        eps = torch.tensor([self.act_ratio * m.min_score for m in memories], device=scores.device)
        choice = route(scores, eps, self.relative)
        if bool((choice < 0).all()):
            return None
        added = torch.zeros_like(adds[0])
        for i, a in enumerate(adds):
            added = torch.where((choice == i).unsqueeze(-1), a, added)
        return torch.where((choice >= 0).unsqueeze(-1), (out.to(torch.float32) + added).to(out.dtype), out)
