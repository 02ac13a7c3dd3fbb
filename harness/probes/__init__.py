"""Batched evaluation probes as plugins: probe families registered by name, each declaring its
metrics (protocol, version, unit, direction, aggregation), composed into one suite that scores every
family's (prompt, target) pairs in shared batched forward passes.

Built-in families: ``counterfact`` (probabilities of the ROME paper, Meng et al. 2022), ``easyedit``
(teacher-forced token accuracies, Wang et al. 2024), ``fluency`` (generation entropy; opt-in), ``consistency`` (ROME's TF-IDF
reference score and essence perplexity; opt-in, needs ROME's files), ``wild`` (generation-based EM/F1, Yang et al. 2025; opt-in), ``capability``
(perplexity on a text and multiple-choice accuracy, general capability along sequential runs; opt-in).
Plugins register with ``@register_probe("name")`` or the ``harness.probes`` entry-point group.

Public API::

    from harness.probes import METRICS, build_probes, summarize

    probes = build_probes()                       # the default families: counterfact, easyedit
    probes = build_probes(["counterfact", "fluency"], fluency_max_length=64)
    pre = probes.measure(model, tok, requests)
    post = probes.measure(model, tok, requests, reference=pre)
    table = summarize(post.metrics)               # {metric: {mean, stderr, count, excluded}}, score = HM
"""
from harness.probes.base import Measurement, MetricInfo, NoSettings, ProbeFamily, ProbeSuite
from harness.probes.registry import METRICS, ENTRY_POINT_GROUP, available, family_of, get_probe, register_probe
from harness.probes.scorer import PairScore, encode_pairs, score_pairs
from harness.probes.summary import harmonic_mean, summarize

# Built-in families register on import, in this order (the order of table columns).
from harness.probes import counterfact, easyedit, fluency, consistency, wild, capability  # noqa: E402,F401  isort: skip
from harness.probes.suite import BatchedProbes, build_probes, probes_from_config  # noqa: E402

__all__ = ["ENTRY_POINT_GROUP", "METRICS", "BatchedProbes", "Measurement", "MetricInfo", "NoSettings", "PairScore",
           "ProbeFamily", "ProbeSuite", "available", "build_probes", "encode_pairs", "family_of", "get_probe",
           "harmonic_mean", "probes_from_config", "register_probe", "score_pairs", "summarize"]
