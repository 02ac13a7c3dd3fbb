"""CounterFact (Meng et al., "Locating and Editing Factual Associations in GPT", 2022) in its two
common layouts, read into ``EditRequest``s.

EasyEdit layout (``kind="counterfact"``; the shipped sample): a JSON array of flat records
    case_id (int or str), prompt (literal text containing the subject), subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth
All of them are required. ``rephrase_prompt``, ``locality_prompt`` and ``locality_ground_truth``
may each be a string or a list of strings (EasyEdit's files use strings; some of its releases use
lists); the locality prompts and answers are paired by position. The template is the prompt with
the first occurrence of the subject replaced by ``{}``; the neighbourhood is
``QA(locality_prompt, locality_ground_truth)``.

ROME layout (``kind="counterfact_rome"``; the ``counterfact.json`` of ROME and MEMIT): records
    case_id, requested_rewrite {prompt (template with one ``{}``), subject,
    target_new {str, id}, target_true {str, id}, relation_id}, paraphrase_prompts [str],
    neighborhood_prompts [str], attribute_prompts [str], generation_prompts [str]
``requested_rewrite`` (with prompt, subject and both targets), ``paraphrase_prompts`` and
``neighborhood_prompts`` are required; ``generation_prompts``, ``attribute_prompts``, the targets'
``id`` and ``relation_id`` are optional. ``target_new``/``target_true`` may also be plain strings.
Every paraphrase, neighbourhood, generation and attribute prompt is kept, in file order.
Neighbourhood prompts are scored against ``target_true`` (ROME's evaluation), so each becomes
``QA(prompt, target_true)``; an element may also be an object ``{prompt, answer}`` (or
``{prompt, target}``) with its own answer. ``relation_id`` and ``target_new.id`` select the
reference snippets of the ``consistency`` probe (``harness.probes.consistency``).
"""
from __future__ import annotations

from harness.data.common import Record, make_request
from harness.types import EditRequest


def parse_easyedit(record: Record) -> EditRequest:
    """One EasyEdit-layout CounterFact record -> ``EditRequest``.

    Raises:
        DataError: a required field missing, of the wrong type or empty; the prompt lacking its subject.
    """
    if record.has("requested_rewrite"):
        raise record.error("requested_rewrite", "this is the ROME layout: load it with kind='counterfact_rome'")
    subject = record.text("subject")
    return make_request(
        record,
        case_id=record.case_id(record.index),
        prompt=record.template("prompt", subject),
        subject=subject,
        target_new=record.target("target_new"),
        target_true=record.target("ground_truth"),
        paraphrase_prompts=record.texts("rephrase_prompt", required=True),
        neighborhood=record.qa_pairs("locality_prompt", "locality_ground_truth"),
    )


def parse_rome(record: Record) -> EditRequest:
    """One ROME-layout CounterFact record -> ``EditRequest``.

    Raises:
        DataError: a required field missing, of the wrong type or empty; a prompt that is not a
            template with exactly one ``{}``.
    """
    rewrite = record.sub("requested_rewrite")
    record.get("neighborhood_prompts")  # required, like paraphrase_prompts: ROME's evaluation reads both
    target_true = _target(rewrite, "target_true")
    return make_request(
        record,
        case_id=record.case_id(record.index),
        prompt=rewrite.given_template("prompt"),
        subject=rewrite.text("subject"),
        target_new=_target(rewrite, "target_new"),
        target_true=target_true,
        paraphrase_prompts=record.texts("paraphrase_prompts", required=True),
        neighborhood=record.qa_items("neighborhood_prompts", target_true),
        generation_prompts=record.texts("generation_prompts"),
        relation_id=rewrite.optional_id("relation_id"),
        target_new_id=_target_id(rewrite, "target_new"),
        target_true_id=_target_id(rewrite, "target_true"),
        attribute_prompts=record.texts("attribute_prompts"),
    )


def _target_id(rewrite: Record, field: str) -> str | None:
    """The ``id`` of a ``{"str", "id"}`` target; None for a plain-string target or no id."""
    if not isinstance(rewrite.raw.get(field), dict):
        return None
    return rewrite.sub(field).optional_id("id")


def _target(rewrite: Record, field: str) -> str:
    """``{"str": ..., "id": ...}`` or a plain string -> the stripped target string."""
    if isinstance(rewrite.raw.get(field), dict):
        return rewrite.sub(field).target("str")
    return rewrite.target(field)
