"""The probe contract, over every registered probe family, and probes as plugins.

For each family (built-ins, entry-point plugins, and the toy family this module registers) on the
tiny model: the metrics it returns are the ones it declares, finite and within their declared
bounds; a measurement against a reference works (pre, then post with ``reference=pre``); a metric
measured alone equals the same metric measured with its whole family; a request measured alone
equals the request measured in a batch (families that sample instead repeat exactly).

A family registered from outside the harness (``@register_probe`` in this module, or an
entry-point package in a subprocess) lands in ``cases.csv``, ``summary.csv`` and ``collect``
when the config names it, with no file of the harness changed: the toy is this one module (plus
its config override), the entry-point plugin one module and its package metadata.
"""
from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from harness.cli import compose_config, to_config
from harness.collect import collect, compare
from harness.data import load_requests
from harness.probes import BatchedProbes, MetricInfo, ProbeFamily, available, get_probe, register_probe
from harness.probes.scorer import Pair, PairScore
from harness.results import read_rows
from harness.runner import ModelCache, run
from harness.types import QA, EditRequest

# ----------------------------------------------------------------------------------------------
# a plugin family, defined outside the harness: the length of the new target in tokens


@register_probe("toy")
class Toy(ProbeFamily):
    """Tokens of ``target_new`` after the rewrite prompt (fewer is better), from the shared scorer."""

    METRICS = (MetricInfo("toy_metric", "toy", 1, unit="tokens", higher_is_better=False),)

    def pairs(self, request: EditRequest) -> list[Pair]:
        return [(request.rewrite_prompt, request.target_new)]

    def compute(self, request: EditRequest, scores: Mapping[Pair, PairScore], generated: Any,
                reference: Mapping[str, Any] | None) -> tuple[dict[str, float], dict[str, Any]]:
        return {"toy_metric": float(len(scores[(request.rewrite_prompt, request.target_new)].target_ids))}, {}


# ----------------------------------------------------------------------------------------------
# the contract, over every registered family

REQUESTS = [
    EditRequest(case_id="a", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                target_true="French", paraphrase_prompts=("Danielle Darrieux spoke", "Darrieux's first language is"),
                neighborhood=(QA("The mother tongue of Jean Gabin is", "French"),),
                portability=(QA("The language Danielle Darrieux dreams in is", "English"),),
                generation_prompts=("Danielle Darrieux was", "Darrieux often said"), relation_id="P103",
                target_new_id="Q1860", target_true_id="Q150"),
    EditRequest(case_id="b", prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar",
                paraphrase_prompts=("Toko Yasuda is a player of the",),
                neighborhood=(QA("Jimi Hendrix plays the", "guitar"), QA("Miles Davis plays the", "trumpet")),
                portability=(QA("The instrument in Toko Yasuda's hands is the", "piano"),),
                generation_prompts=("Toko Yasuda",), relation_id="P1303", target_new_id="Q5994", target_true_id="Q6607"),
    EditRequest(case_id="c", prompt="The capital of {} is", subject="France", target_new="the city of Lyon",
                target_true="Paris", paraphrase_prompts=("France's capital city is",),
                neighborhood=(QA("The capital of Spain is", "Madrid"),),
                portability=(QA("The seat of the French government is in", "the city of Lyon"),),
                generation_prompts=("France is",), relation_id="P36", target_new_id="Q456", target_true_id="Q90"),
]


# Settings a family needs for every declared metric to have a value (default settings elsewhere):
# ``capability`` measures ``mc_accuracy`` only with a task file (NaN without one); ``consistency``
# needs ROME's reference files (written to a temporary folder: a callable receives it); ``wild``'s
# judge metrics need a judge model.
def _consistency_files(root: Path) -> dict[str, str]:
    words = ["danielle", "darrieux", "was", "toko", "yasuda", "france", "is", "english", "piano", "lyon"]
    np.save(root / "idf.npy", np.linspace(0.5, 3.0, len(words)))
    (root / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (root / "snippets.json").write_text(json.dumps([  # the new objects' passages, then the subjects' own
        {"relation_id": rel, "target_id": tid, "samples": [{"name": name, "text": text}]}
        for rel, tid, name, text in (("P103", "Q1860", "n", "Danielle Darrieux was English"),
                                     ("P1303", "Q5994", "n", "Toko Yasuda and the piano"),
                                     ("P36", "Q456", "n", "France is Lyon"),
                                     ("P103", "Q150", "Danielle Darrieux", "Danielle Darrieux was a French actress"),
                                     ("P1303", "Q6607", "Toko Yasuda", "Toko Yasuda plays the guitar"),
                                     ("P36", "Q90", "France", "France is a country whose capital is Paris"))]))
    return {"idf": str(root / "idf.npy"), "vocab": str(root / "vocab.json"), "snippets": str(root / "snippets.json")}


CONTRACT_SETTINGS: dict[str, Any] = {
    "capability": {"tasks": str(Path(__file__).resolve().parents[1] / "harness" / "data" / "samples"
                                / "capability-mc-example.jsonl")},
    "consistency": _consistency_files,
    "wild": {"judge": "tiny"},  # the judge metrics exist only with a judge
}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def same_rows(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return [list(r) for r in a] == [list(r) for r in b] and all(
        same(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module")
def model_tok():
    from harness.models import load_model

    return load_model("tiny", device="cpu", dtype="float32")


@pytest.mark.parametrize("name", available())
def test_metadata_is_complete(name: str) -> None:
    cls = get_probe(name)
    assert cls.name == name and cls.METRICS
    per_case = {i.name for i in cls.METRICS if i.per_case}
    for info in cls.METRICS:
        assert isinstance(info.version, int) and not isinstance(info.version, bool) and info.version >= 1
        assert isinstance(info.unit, str) and info.unit and isinstance(info.protocol, str) and info.protocol
        assert isinstance(info.higher_is_better, bool) and info.direction in ("↑", "↓")
        assert info.aggregate in ("mean", "hmean") and set(info.inputs) <= per_case


@pytest.mark.parametrize("name", available())
def test_family_contract_on_the_tiny_model(name: str, model_tok, tmp_path: Path) -> None:
    model, tok = model_tok
    cls = get_probe(name)
    settings = CONTRACT_SETTINGS.get(name)
    settings = settings(tmp_path) if callable(settings) else settings
    suite = BatchedProbes([cls(settings=settings, batch_size=4)], batch_size=4)
    per_case = [i.name for i in cls.METRICS if i.per_case]
    assert [i.name for i in suite.infos()] == [i.name for i in cls.METRICS]

    pre = suite.measure(model, tok, REQUESTS)
    for row, extra in zip(pre.metrics, pre.extras):
        assert list(row) == per_case  # declared == returned, in declaration order
        assert all(math.isfinite(v) for v in row.values()), row
        for m, v in row.items():
            low, high = cls.declared()[m].bounds or (-math.inf, math.inf)
            assert low <= v <= high, (m, v)
        assert extra["nonfinite"] is False
        json.dumps(extra)  # extras are plain data

    # against a reference: the unchanged model agrees with its own reference exactly ...
    again = suite.measure(model, tok, REQUESTS, reference=pre)
    assert same_rows(again.metrics, pre.metrics)
    # ... an edited one is measured against it, and a reference of other cases is refused
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn(
                model.model.layers[0].mlp.down_proj.weight.shape, generator=torch.Generator().manual_seed(0)))
        post = suite.measure(model, tok, REQUESTS, reference=pre)
    finally:
        model.load_state_dict(state)
    assert [list(r) for r in post.metrics] == [per_case] * len(REQUESTS)
    assert all(math.isfinite(v) for row in post.metrics for v in row.values())
    with pytest.raises(ValueError, match="reference"):
        suite.measure(model, tok, REQUESTS[::-1], reference=pre)

    # a metric measured alone has the value it has with its whole family
    for m in per_case:
        alone = BatchedProbes([cls([m], settings, batch_size=4)], batch_size=4).measure(model, tok, REQUESTS)
        if cls.batch_invariant or len(per_case) == 1:
            assert all(same(a[m], b[m]) for a, b in zip(alone.metrics, pre.metrics)), m

    # a request alone gives what it gives in the batch (sampling families: a call repeats exactly)
    if cls.batch_invariant:
        one_by_one = [suite.measure(model, tok, [r]).metrics[0] for r in REQUESTS]
        assert same_rows(one_by_one, pre.metrics)
    else:
        assert same_rows(suite.measure(model, tok, REQUESTS).metrics, pre.metrics)


def test_the_contract_covers_every_built_in_family() -> None:
    assert {"counterfact", "easyedit", "fluency", "consistency", "toy"} <= set(available())


# ----------------------------------------------------------------------------------------------
# plugins end to end


def test_a_registered_plugin_lands_in_every_table(tmp_path: Path) -> None:
    """The toy family above, named in the config: its metric is a column of cases.csv, a row of
    summary.csv (version, ↓, unit) and of collect's table; no harness file knows it."""
    ov = ["experiment=smoke", "threads=1", "data.limit=2", "probes.metrics=[efficacy_score,toy]"]
    run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=ModelCache(), progress=False)
    rows = read_rows(tmp_path / "run" / "cases.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert float(r["pre_toy_metric"]) == float(r["post_toy_metric"]) >= 1  # tokens of target_new
        assert "toy_metric=1" in r["probe_versions"].split()
    summary = {(r["phase"], r["metric"]): r for r in read_rows(tmp_path / "run" / "summary.csv")}
    toy = summary[("post", "toy_metric")]
    assert (toy["version"], toy["direction"], toy["unit"], toy["count"]) == ("1", "↓", "tokens", "2")
    assert summary[("post", "efficacy_score")]["direction"] == "↑"
    assert summary[("post", "efficacy_score")]["unit"] == "fraction"

    df = collect(tmp_path)
    got = df[(df.metric == "toy_metric") & (df.phase == "post")].iloc[0]
    assert (got["direction"], got["unit"], got["version"]) == ("↓", "tokens", 1)
    table = compare(df)
    assert "toy_metric ↓" in table and "efficacy_score ↑" in table and "tokens: toy_metric" in table


PLUGIN = '''
from harness.probes import MetricInfo, ProbeFamily


class Chars(ProbeFamily):
    """Characters of the new target (a probe that needs no model at all)."""

    METRICS = (MetricInfo("chars", "plugin", 2, unit="characters", higher_is_better=False),)

    def compute(self, request, scores, generated, reference):
        return {"chars": float(len(request.target_new))}, {}
'''


def test_an_entry_point_plugin_is_found_and_measured(tmp_path: Path, monkeypatch) -> None:
    """A package installed beside the harness (one module and its entry point) is loaded from the
    ``harness.probes`` group and measured when the config names it."""
    from harness.probes import registry

    (tmp_path / "chars_probe.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "chars_probe-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: chars-probe\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.probes]\nchars = chars_probe:Chars\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.PROBES, "classes", dict(registry.PROBES.classes))  # undone after the test
    monkeypatch.setattr(registry.PROBES, "entry_points_loaded", False)
    assert "chars" in available() and get_probe("chars").__module__ == "chars_probe"

    ov = ["experiment=smoke", "threads=1", "data.limit=2", "probes.metrics=[chars,rewrite_acc]"]
    run(to_config(compose_config(ov)), tmp_path / "run", ov, cache=ModelCache(), progress=False)
    targets = {r.case_id: r.target_new for r in load_requests("counterfact", limit=2).requests}
    rows = read_rows(tmp_path / "run" / "cases.csv")
    assert {r["case_id"]: (float(r["pre_chars"]), float(r["post_chars"])) for r in rows} == \
        {c: (float(len(t)), float(len(t))) for c, t in targets.items()}
    assert all("chars=2" in r["probe_versions"].split() and "pre_rewrite_acc" in r for r in rows)
    summary = {(r["phase"], r["metric"]): r for r in read_rows(tmp_path / "run" / "summary.csv")}
    assert (summary[("post", "chars")]["direction"], summary[("post", "chars")]["unit"]) == ("↓", "characters")
