"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1):
which layers' states carry a fact, so which layer to edit. ``python -m harness.trace`` runs it.

* ``prompts``: the traced prompt (subject span, answer token), ROME's token groups, the noise.
* ``patch``: the clean, corrupted and corrupted-with-restoration runs, batched, and the grid.
* ``report``: many records -> effect tables, averages, peak layer, files; ``plot``: heatmaps.
* ``cli``: the command line.
"""
from harness.trace.patch import TRACE_KINDS, RecordTrace, restored_probs, trace_record, window_layers
from harness.trace.prompts import TOKEN_GROUPS, TracePrompt, encode_trace_prompt, subject_token_range, token_groups
from harness.trace.report import TraceOptions, TraceResult, peak, run_trace

__all__ = ["TOKEN_GROUPS", "TRACE_KINDS", "RecordTrace", "TraceOptions", "TracePrompt", "TraceResult",
           "encode_trace_prompt", "peak", "restored_probs", "run_trace", "subject_token_range", "token_groups",
           "trace_record", "window_layers"]
