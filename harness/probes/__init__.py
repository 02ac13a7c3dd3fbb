"""Batched evaluation probes: CounterFact probabilities (Meng et al. 2022), EasyEdit token accuracies
(Wang et al. 2024) and generation fluency, all scored from shared batched forward passes.

Public API::

    from harness.probes import METRICS, build_probes, summarize

    probes = build_probes()                       # all metrics but fluency
    pre = probes.measure(model, tok, requests)
    post = probes.measure(model, tok, requests, reference=pre)
    table = summarize(post.metrics)               # {metric: {mean, stderr, count}}, score = HM
"""
from harness.probes.base import Measurement, MetricInfo, ProbeSuite
from harness.probes.scorer import PairScore, encode_pairs, score_pairs
from harness.probes.suite import METRICS, BatchedProbes, build_probes
from harness.probes.summary import summarize

__all__ = ["METRICS", "BatchedProbes", "Measurement", "MetricInfo", "PairScore", "ProbeSuite", "build_probes",
           "encode_pairs", "score_pairs", "summarize"]
