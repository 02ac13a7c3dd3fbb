"""``kn``: knowledge neurons (Dai et al., ACL 2022), docs/algorithms/kn.md.

Damai Dai, Li Dong, Yaru Hao, Zhifang Sui, Baobao Chang, Furu Wei, "Knowledge Neurons in Pretrained
Transformers", ACL 2022. Per request:

1. **Prompts.** The rewrite prompt and generated variants of it: the context templates
   ``"<sampled text>. {prompt}"`` of the unedited model (``locate.TemplateCache``, ``templates.*``),
   plus the request's paraphrase prompts when ``use_paraphrases`` (off by default: CounterFact
   scores them as generalisation).
2. **Attribution** (integrated gradients). For each prompt and each layer ``l`` in ``layers``, the
   FFN intermediate activation ``a`` at the last prompt token (the input of the MLP output
   projection: Llama's ``act(gate) * up``, GPT-2's ``gelu(c_fc)``) is replaced by ``α a`` for
   ``steps`` values ``α = 0 … 1`` (the reference's ``linspace``), and the gradients of the
   probability of the ground truth's first token are summed: ``Attr_i = a_i / m · Σ_α ∂P/∂(α a)_i``.
   The prompt's prefix runs once (KV cache); only the last token is recomputed per step batch, so
   the result is that of full forwards at a fraction of the cost.
3. **Thresholds.** Per prompt, the coarse neurons are those with ``Attr > adaptive_threshold ×``
   the prompt's maximum over all layers; neurons shared by more than ``p`` of the prompts are kept.
   As in the paper, when the count falls outside ``neuron_range`` ``p`` moves in steps of 0.05
   (down while too few, up while too many and the count stays within range from below).
4. **Edit.** For each kept neuron ``(l, i)``, the value vector (column ``i`` of the MLP output
   projection) becomes ``w + scale · (e_new − e_old)``: ``e`` rows of the input embedding, ``e_new``
   the first token of ``target_new``, ``e_old`` the model's own top prediction at the prompt
   (``erase: prediction``, the reference) or the first token of ``target_true`` (``erase: true``).

The ground truth of the attribution is ``target_true`` (the model's own prediction when a record has
none). The chosen neurons go into the report (``info["neurons"] = "l:i l:i ..."``, with ``n_neurons``,
``p_used`` and the attribution maximum). Nothing is kept between calls (no state); the context
templates come from the base model (``prepare``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from harness.algorithms.base import EditAlgorithm, register, write_deltas
from harness.algorithms.hparams import build_blocks
from harness.algorithms.hooks import Hooks, first_input, model_device
from harness.algorithms.locate import TemplateCache, TemplateHparams, fill_template
from harness.algorithms.replay import fresh_cache, prefix_cache
from harness.models import cache_kwargs, get_module, model_spec, num_layers
from harness.tokens import encode_pairs
from harness.types import EditReport, EditRequest

log = logging.getLogger(__name__)


def _default_templates() -> TemplateHparams:
    # four generated variants of 10 tokens beside the bare prompt: five prompts for the sharing threshold
    return TemplateHparams(length_params=[[10, 4]])


@dataclass
class KnHparams:
    """Knowledge neurons; defaults are the paper's thresholds and the reference's edit scale
    (evidence in conf/algorithm/kn.yaml).

    Attributes:
        layers: layers searched for knowledge neurons (and whose MLP output projections may be
            written); None = every layer, as the paper.
        steps: m, the integrated-gradient steps (the paper's 20).
        batch_size: steps per forward pass (divides ``steps``).
        adaptive_threshold: t, the coarse threshold as a fraction of the prompt's maximum attribution (0.2).
        p: the sharing threshold: keep neurons coarse in more than this fraction of the prompts (0.7).
        neuron_range: [lo, hi]: move ``p`` by 0.05 until the count is within (the paper's [2, 5]);
            None keeps ``p`` as given.
        scale: multiplier of the embeddings added and subtracted (the reference's 2).
        erase: the embedding subtracted: ``prediction`` (the model's top first token, the reference)
            or ``true`` (the first token of ``target_true``; the prediction when it is missing).
        use_paraphrases: also attribute over the request's paraphrase prompts.
        templates: ``locate.TemplateHparams`` of the generated prompt variants.
    """

    layers: Optional[list[int]] = None
    steps: int = 20
    batch_size: int = 20
    adaptive_threshold: float = 0.2
    p: float = 0.7
    neuron_range: Optional[list[int]] = field(default_factory=lambda: [2, 5])
    scale: float = 2.0
    erase: str = "prediction"
    use_paraphrases: bool = False
    templates: TemplateHparams = field(default_factory=_default_templates)

    def __post_init__(self) -> None:
        build_blocks(self)
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
            if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct non-negative layer indices or null, got {self.layers}")
        if self.steps < 1 or self.batch_size < 1 or self.steps % self.batch_size:
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of batch_size ({self.batch_size})")
        if not 0 < self.adaptive_threshold < 1:
            raise ValueError(f"adaptive_threshold must be in (0, 1), got {self.adaptive_threshold}")
        if not 0 <= self.p < 1:
            raise ValueError(f"p must be in [0, 1), got {self.p}")
        if self.neuron_range is not None:
            self.neuron_range = [int(x) for x in self.neuron_range]
            if len(self.neuron_range) != 2 or not 1 <= self.neuron_range[0] <= self.neuron_range[1]:
                raise ValueError(f"neuron_range must be [lo, hi] with 1 <= lo <= hi, got {self.neuron_range}")
        if self.erase not in ("prediction", "true"):
            raise ValueError(f"erase must be 'prediction' or 'true', got {self.erase!r}")


@register("kn")
class KnowledgeNeurons(EditAlgorithm):
    """Knowledge-neuron attribution and value-vector edit (see module docstring). No state."""

    Hparams = KnHparams

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.templates = TemplateCache()  # from the model at first use (the unedited one); survives restores

    # -- contract ----------------------------------------------------------------------------
    def targets(self, model: nn.Module, requests: Sequence[EditRequest]) -> set[str]:
        spec = model_spec(model)
        return {spec.mlp_out_weight(layer) for layer in self._layers(model)}

    def prepare(self, model: nn.Module, tok: Any) -> None:
        """The generated prompt variants, from the model as it is now (the unedited one)."""
        hp = self.hparams.templates
        self.templates.get(model, tok, hp.length_params, hp.seed)

    def apply(self, model: nn.Module, tok: Any, requests: Sequence[EditRequest]) -> EditReport:
        t_start = time.perf_counter()
        spec, hp = model_spec(model), self.hparams
        declared = self.targets(model, requests)
        params = dict(model.named_parameters())
        embed = get_module(model, spec.embed).weight.detach()
        self.prepare(model, tok)
        info: dict[str, Any] = {"n_requests": len(requests)}
        deltas: dict[str, torch.Tensor] = {}
        chosen_all, t_attr = [], 0.0
        for req in requests:
            t = time.perf_counter()
            truth, pred = self._first_tokens(model, tok, req)
            scores = [self.attribute(model, tok, text, truth) for text in self._prompts(model, tok, req)]
            t_attr += time.perf_counter() - t
            neurons, p_used, counts = self.select(scores)
            new = encode_pairs(tok, [(req.rewrite_prompt, req.target_new)])[0].target_ids[0]
            old = pred if hp.erase == "prediction" or req.target_true is None else \
                encode_pairs(tok, [(req.rewrite_prompt, req.target_true)])[0].target_ids[0]
            value = hp.scale * (embed[new].float() - embed[old].float())
            for layer, i in neurons:
                name = spec.mlp_out_weight(layer)
                d = deltas.setdefault(name, torch.zeros_like(params[name], dtype=torch.float32))
                if spec.out_transposed:
                    d[i, :] += value.to(d.device)
                else:
                    d[:, i] += value.to(d.device)
            chosen_all += neurons
            log.info("%s %s: %d neurons %s (p %.2f, counts %s), %r -> %r", self.name, req.case_id, len(neurons),
                     neurons, p_used, counts, tok.decode([old]), tok.decode([new]))
            if len(requests) == 1:
                info["p_used"] = p_used
                info["attr_max"] = max(float(s.max()) for s in scores)
        written = write_deltas(model, deltas, declared)
        info["neurons"] = " ".join(f"{layer}:{i}" for layer, i in chosen_all)
        info["n_neurons"] = len(chosen_all)
        info["t_attribution"] = t_attr
        info.update(written.info())
        return EditReport(seconds=time.perf_counter() - t_start, delta_norms=written.norms, info=info)

    # -- pieces ------------------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> list[int]:
        n = num_layers(model)
        layers = list(range(n)) if self.hparams.layers is None else self.hparams.layers
        bad = [layer for layer in layers if layer >= n]
        if bad:
            raise ValueError(f"{self.name}: hparam layers={layers} includes {bad}; the model has layers 0..{n - 1}")
        return layers

    def _prompts(self, model: nn.Module, tok: Any, req: EditRequest) -> list[str]:
        hp = self.hparams
        templates = self.templates.get(model, tok, hp.templates.length_params, hp.templates.seed)
        out = [fill_template(t, req.rewrite_prompt) for t in templates]
        if hp.use_paraphrases:
            out += list(req.paraphrase_prompts)
        return list(dict.fromkeys(out))

    @torch.no_grad()
    def _first_tokens(self, model: nn.Module, tok: Any, req: EditRequest) -> tuple[int, int]:
        """(the attribution's ground-truth token, the model's top prediction) at the rewrite prompt."""
        ids = torch.tensor([encode_pairs(tok, [(req.rewrite_prompt, req.target_new)])[0].prompt_ids],
                           device=model_device(model))
        pred = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if req.target_true is None:
            return pred, pred
        return encode_pairs(tok, [(req.rewrite_prompt, req.target_true)])[0].target_ids[0], pred

    def attribute(self, model: nn.Module, tok: Any, prompt: str, token: int) -> torch.Tensor:
        """Integrated-gradient attributions of every FFN neuron at the prompt's last token.

        Args:
            prompt: the full prompt text (subject filled in).
            token: the token id whose probability is attributed.

        Returns:
            [len(layers), d_ff] float32 on the CPU, rows in the order of ``layers``.
        """
        hp, spec = self.hparams, model_spec(model)
        layers = self._layers(model)
        dev = model_device(model)
        ids = encode_pairs(tok, [(prompt, "x")])[0].prompt_ids
        prefix, last = list(ids[:-1]), ids[-1]
        b = hp.batch_size
        cache = None
        if prefix:  # its logits are not read: prefix_cache computes none
            cache = prefix_cache(model, input_ids=torch.tensor([prefix] * b, device=dev))
        last_ids = torch.full((b, 1), last, dtype=torch.long, device=dev)
        outs: dict[int, torch.Tensor] = {}

        def run(hooks_on: dict[int, Any]) -> torch.Tensor:
            kw: dict[str, Any] = {"input_ids": last_ids, "use_cache": cache is not None}
            if cache is not None:
                kw.update(cache_kwargs(model, fresh_cache(cache)))
            with Hooks() as hooks:
                for layer, fn in hooks_on.items():
                    hooks.input(get_module(model, spec.mlp_out.format(layer)), fn)
                return model(**kw).logits[:, -1].float()

        def grab(layer: int):
            def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                outs[layer] = first_input(args, kwargs)[0, -1].detach()
            return fn

        with torch.no_grad():
            run({layer: grab(layer) for layer in layers})  # the baseline activations a
        alphas = torch.linspace(0, 1, hp.steps)
        rows = []
        for layer in layers:
            base = outs[layer]
            total = torch.zeros_like(base, dtype=torch.float32)
            for chunk in alphas.split(b):
                scaled = (chunk.to(base.device, base.dtype)[:, None] * base[None, :]).requires_grad_(True)

                def patch(_m: nn.Module, args: tuple, kwargs: dict, scaled: torch.Tensor = scaled) -> Any:
                    x = first_input(args, kwargs)
                    x = torch.cat([x[:, :-1], scaled[:, None, :].to(x.dtype)], dim=1)
                    if args:
                        return (x, *args[1:]), kwargs
                    return (), {**kwargs, next(iter(kwargs)): x}

                with torch.enable_grad():
                    probs = torch.softmax(run({layer: patch}), dim=-1)[:, token]
                    (grad,) = torch.autograd.grad(probs.sum(), scaled)
                total += grad.float().sum(0)
            rows.append((total * base.float() / hp.steps).cpu())
        return torch.stack(rows)

    def select(self, scores: Sequence[torch.Tensor]) -> tuple[list[tuple[int, int]], float, dict[int, int]]:
        """The refined neurons from per-prompt attributions ([len(layers), d_ff] each).

        Returns:
            (neurons as (layer, index) sorted by layer then index, the ``p`` used, a histogram
            {number of prompts sharing: neurons}).
        """
        hp = self.hparams
        layers = hp.layers
        counts: Counter = Counter()
        for s in scores:
            coarse = torch.nonzero(s > hp.adaptive_threshold * s.max()).tolist()
            counts.update((r, c) for r, c in coarse)
        n = len(scores)

        def kept(p100: int) -> list[tuple[int, int]]:
            return sorted(k for k, c in counts.items() if c * 100 > p100 * n)

        p100 = round(hp.p * 100)
        chosen = kept(p100)
        if hp.neuron_range is not None:
            lo, hi = hp.neuron_range
            while len(chosen) < lo and p100 > 0:
                p100 = max(p100 - 5, 0)
                chosen = kept(p100)
            while len(chosen) > hi and p100 < 95:
                nxt = kept(p100 + 5)
                if len(nxt) < lo:
                    break
                p100, chosen = p100 + 5, nxt
        hist = dict(sorted(Counter(counts.values()).items()))
        to_layer = (lambda r: r) if layers is None else (lambda r: layers[r])
        return [(to_layer(r), c) for r, c in chosen], p100 / 100, hist
