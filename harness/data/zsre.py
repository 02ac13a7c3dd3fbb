"""zsRE question-answering edits (Levy et al., 2017) as prepared for MEND (Mitchell et al., "Fast
Model Editing at Scale", 2022), read into ``EditRequest``s (``kind="zsre"``).

Layout: a JSON array of records
    subject, src (the question), pred, rephrase, alt (the new answer),
    answers (list; ``answers[0]`` is the true answer), loc ("nq question: ..."), loc_ans, cond
Mapping, as in EasyEdit's ``ZsreDataset``:
    case_id = the record's 0-based position in the file (the layout has no id),
    prompt = ``src`` with the first occurrence of ``subject`` replaced by ``{}``,
    target_new = ``alt``, target_true = ``answers[0]``, paraphrase_prompts = (``rephrase``,),
    neighborhood = (QA(``loc``, ``loc_ans``),): the ``loc`` text is kept whole, ``nq question:``
    prefix included and no ``?`` appended (EasyEdit does so; ROME's ``MENDQADataset`` appends "?").
``pred``, ``cond`` and ``answers[1:]`` are not read. Records whose subject does not occur verbatim
in ``src`` are invalid: matching it case-insensitively would put a differently cased subject back
into the prompt (the shipped MEND file has no such record). Records with an empty ``alt`` are
invalid, as EasyEdit drops them too. Note that ROME's zsRE evaluation takes ``answers[0]`` as the
*new* target; we follow EasyEdit and the field names (``alt`` is new, ``answers[0]`` is old).
"""
from __future__ import annotations

from harness.data.common import Record, make_request
from harness.types import QA, EditRequest


def parse_zsre(record: Record) -> EditRequest:
    """One MEND-layout zsRE record -> ``EditRequest``.

    Raises:
        DataError: a field missing, of the wrong type or empty (including an empty ``alt`` or
            ``answers``); ``src`` lacking the subject.
    """
    subject = record.text("subject")
    answers = record.texts("answers", required=True)
    if not answers:
        raise record.error("answers", "empty list: the true answer is answers[0]")
    return make_request(
        record,
        case_id=str(record.index),
        prompt=record.template("src", subject),
        subject=subject,
        target_new=record.target("alt"),
        target_true=answers[0].strip(),
        paraphrase_prompts=(record.text("rephrase"),),
        neighborhood=(QA(record.text("loc"), record.target("loc_ans")),),
    )
