"""Your own edit requests, as JSON Lines or CSV (``kind="jsonl"``, ``"csv"``, or ``"user"`` to choose
by the file's extension: ``.jsonl``/``.ndjson`` JSON Lines, ``.csv`` CSV, ``.json`` a JSON array of
the same objects). Examples: ``harness/data/samples/user-example.jsonl`` and ``user-example.csv``;
the same table with examples in docs/data.md.

One record per JSONL line (blank lines ignored) or per CSV data row, with these fields/columns:

=====================  ========  =================================================================
field                  required  meaning
=====================  ========  =================================================================
case_id                no        unique id (string or integer); default: the 0-based record index
prompt                 yes       a template with exactly one ``{}`` for the subject, or literal text
                                 containing the subject (its first occurrence becomes ``{}``)
subject                yes       the subject
target_new             yes       the new object (surrounding whitespace is stripped)
target_true            no        the true (old) object
paraphrase_prompts     no        list of full prompts (subject filled in) asking for the same fact
neighborhood           no        list of ``{"prompt": ..., "answer": ...}``; a plain string item is
                                 a prompt whose answer is ``target_true``
neighborhood_prompts   no        instead of ``neighborhood``: list of prompts ...
neighborhood_answers   no        ... and their answers, paired by position (default: ``target_true``
                                 for every prompt)
portability            no        list of ``{"prompt": ..., "answer": ...}``
portability_prompts    no        instead of ``portability``: list of prompts ...
portability_answers    no        ... and their answers (required with portability_prompts)
generation_prompts     no        list of prompts for free generation
relation_id            no        the fact's relation id (a string or an integer, e.g. Wikidata
                                 ``P103``); with ``target_new_id`` it selects the ``consistency``
                                 probe's reference snippets
target_new_id          no        the new object's id (e.g. Wikidata ``Q1860``)
target_true_id         no        the true object's id (e.g. ``Q150``; needs ``target_true``); with
                                 ``relation_id`` it selects the snippets of ``essence_score``
=====================  ========  =================================================================

In JSONL, lists are JSON arrays (a single string is taken as a one-element list) and null means
absent. In CSV every cell is text: an empty cell means absent; a list column holds a JSON array
(``["first prompt", "second prompt"]``; a cell not starting with ``[`` is one single item); the
``neighborhood``/``portability`` columns hold a JSON array of objects. Unknown fields or columns
are an error, so that a misspelt optional column is not silently ignored. An id is a non-blank
string or (JSONL) an integer, stored as text with surrounding whitespace stripped (the ROME-layout
CounterFact's ``relation_id``, ``target_new.id`` and ``target_true.id``); docs/data.md.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from harness.data.common import DataError, Located, Record, make_request, read_json_array
from harness.types import QA, EditRequest

FIELDS = (
    "case_id", "prompt", "subject", "target_new", "target_true", "paraphrase_prompts",
    "neighborhood", "neighborhood_prompts", "neighborhood_answers",
    "portability", "portability_prompts", "portability_answers", "generation_prompts",
    "relation_id", "target_new_id", "target_true_id",
)
LIST_FIELDS = frozenset(FIELDS[5:13])  # paraphrase_prompts ... generation_prompts
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"}


def read_user(path: Path, fmt: str) -> list[Any]:
    """The raw records of a user file; ``fmt`` is ``jsonl``, ``csv``, ``json`` or ``user`` (by extension).

    A JSONL line that is not valid JSON becomes a ``DataError`` item in the list, so that it is
    raised, or skipped under ``skip_invalid``, like any other invalid record.

    Raises:
        FileNotFoundError: no such file.
        DataError: an unknown extension (``user``), an unknown CSV column, a JSON file not an array.
    """
    if fmt == "user":
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(path, None, None,
                            f"cannot tell the format from the extension; use one of {sorted(SUFFIXES)}")
        fmt = SUFFIXES[path.suffix.lower()]
    if fmt == "json":
        return read_json_array(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8-sig", newline="") as f:
        return _read_csv(path, f) if fmt == "csv" else _read_jsonl(path, f)


def _read_jsonl(path: Path, lines: Any) -> list[Any]:
    records: list[Any] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            records.append(DataError(path, len(records), None, f"not valid JSON: {exc}", number))
            continue
        records[-1] = Located(records[-1], number)
    return records


def _read_csv(path: Path, f: Any) -> list[Any]:
    reader = csv.DictReader(f)
    unknown = [c for c in reader.fieldnames or () if c not in FIELDS]
    if unknown:
        raise DataError(path, None, unknown[0], f"unknown column; the columns are {', '.join(FIELDS)}")
    out: list[Any] = []
    start = 2  # the header is line 1; a quoted cell may span lines
    for row in reader:
        out.append(Located(_CsvRow(row), start))
        start = reader.line_num + 1
    return out


class _CsvRow(dict):
    """A CSV row (cells as text), told apart from a JSON object so that list cells get decoded."""


def parse_user(record: Record) -> EditRequest:
    """One user record (JSONL object or CSV row) -> ``EditRequest``; see the module docstring.

    Raises:
        DataError: an unknown or missing field, a wrong type, an empty target or id, a prompt
            lacking its subject or holding more than one ``{}``, a CSV list cell that is not a JSON
            array, a ``target_true_id`` without ``target_true``.
    """
    if isinstance(record.raw, _CsvRow):
        record = Record(_decode_csv_row(record), record.path, record.index, line=record.line)
    unknown = sorted(set(record.raw) - set(FIELDS), key=str)
    if unknown:
        raise record.error(str(unknown[0]), f"unknown field; the fields are {', '.join(FIELDS)}")
    subject = record.text("subject")
    prompt = record.text("prompt")
    target_true = record.optional_target("target_true")
    if record.has("target_true_id") and target_true is None:
        raise record.error("target_true_id", "given without target_true, the object it identifies")
    return make_request(
        record,
        case_id=record.case_id(record.index),
        prompt=record.given_template("prompt") if "{}" in prompt else record.template("prompt", subject),
        subject=subject,
        target_new=record.target("target_new"),
        target_true=target_true,
        paraphrase_prompts=record.texts("paraphrase_prompts"),
        neighborhood=_pairs(record, "neighborhood", target_true),
        portability=_pairs(record, "portability", None),
        generation_prompts=record.texts("generation_prompts"),
        relation_id=record.optional_id("relation_id"),
        target_new_id=record.optional_id("target_new_id"),
        target_true_id=record.optional_id("target_true_id"),
    )


def _pairs(record: Record, name: str, default_answer: str | None) -> tuple[QA, ...]:
    """``name`` as a list of objects, or ``name_prompts`` + ``name_answers``; not both."""
    prompts, answers = f"{name}_prompts", f"{name}_answers"
    if record.has(name):
        if record.has(prompts) or record.has(answers):
            extra = prompts if record.has(prompts) else answers
            raise record.error(extra, f"give either {name!r} or {prompts!r}, not both")
        return record.qa_items(name, default_answer)
    if record.has(answers) and not record.has(prompts):
        raise record.error(prompts, f"missing while {answers!r} is given")
    if record.has(answers):
        return record.qa_pairs(prompts, answers)
    if not record.has(prompts):
        return ()
    if default_answer is None:
        raise record.error(answers, f"missing: the prompts in {prompts!r} need answers")
    return tuple(QA(p, default_answer) for p in record.texts(prompts))


def _decode_csv_row(record: Record) -> dict[str, Any]:
    """Cells -> values: empty cells dropped, list cells decoded from JSON."""
    if None in record.raw:
        raise record.error(None, "more cells than columns in the header")
    out: dict[str, Any] = {}
    for key, cell in record.raw.items():
        if cell is None or not cell.strip():
            continue
        if key in LIST_FIELDS and cell.lstrip().startswith("["):
            try:
                out[key] = json.loads(cell)
            except json.JSONDecodeError as exc:
                raise record.error(key, f"not a valid JSON array: {exc}") from exc
        else:
            out[key] = cell
    return out
