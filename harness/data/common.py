"""What every loader shares: the error type, the loaded-data container, checked field access, and
the loop that turns raw records into ``EditRequest``s (window selection, skipping, duplicate ids).

Conventions, the same for every layout:
  * Records are numbered from 0 by their position in the file (JSON array element, JSONL non-blank
    line, CSV data row). ``offset``/``limit`` select records by that position *before* validation,
    so the same settings always pick the same cases whether or not some of them are invalid; with
    ``skip_invalid`` a window can therefore yield fewer than ``limit`` requests.
  * Targets and answers are stripped of surrounding whitespace (they are written without a leading
    space; the probes add it when tokenising). A target or answer that is empty after stripping is
    invalid.
  * A literal prompt becomes a template by replacing the *first* occurrence of the subject with
    ``{}`` (ROME's convention; in the shipped CounterFact and zsRE files every subject occurs
    exactly once). A literal prompt that already contains ``{}`` is invalid: it would be ambiguous.
  * ``case_id`` values must be unique among the selected records: results are resumed by them.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.types import QA, EditRequest

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or one of its records is malformed.

    The message counts from 1, as editors do: ``file: line 7 (record 6): field 'x': reason`` for
    line-based files (JSONL, CSV), ``file: record 6: ...`` for JSON arrays.

    Attributes:
        path: the file.
        index: 0-based record position in the file, or None for a file-level problem.
        field: the offending field (dotted for nested fields, e.g. ``requested_rewrite.subject``),
            or None when the record as a whole is wrong.
        reason: what is wrong, in words.
        line: 1-based line of the record in a line-based file, else None.
    """

    def __init__(self, path: str | Path, index: int | None, field: str | None, reason: str,
                 line: int | None = None) -> None:
        self.path, self.index, self.field, self.reason, self.line = str(path), index, field, reason, line
        where = self.path
        if line is not None:
            where += f": line {line}" + (f" (record {index + 1})" if index is not None else "")
        elif index is not None:
            where += f": record {index + 1}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Located:
    """A raw record and the 1-based line where it starts (line-based readers return these)."""

    value: Any
    line: int


@dataclass(frozen=True)
class Skipped:
    """A record left out under ``skip_invalid``: its position, the field at fault and why."""

    index: int
    field: str | None
    reason: str


@dataclass(frozen=True)
class LoadedData:
    """The outcome of ``load_requests``.

    Attributes:
        kind: the layout the file was read as.
        path: the file read.
        requests: the valid requests of the selected window, in file order.
        skipped: the invalid records of the window (empty unless ``skip_invalid``).
        offset: position of the first selected record.
        total: number of records in the whole file.
    """

    kind: str
    path: Path
    requests: tuple[EditRequest, ...]
    skipped: tuple[Skipped, ...] = ()
    offset: int = 0
    total: int = 0

    def __iter__(self) -> Iterator[EditRequest]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


class Record:
    """One raw record (a dict) with checked accessors that raise ``DataError`` naming file, index, field."""

    def __init__(self, raw: Any, path: str | Path, index: int, prefix: str = "", line: int | None = None) -> None:
        self.path, self.index, self.prefix, self.line = path, index, prefix, line
        if not isinstance(raw, dict):
            raise DataError(path, index, prefix.rstrip(".") or None, f"expected an object, got {type(raw).__name__}",
                            line)
        self.raw: dict[str, Any] = raw

    def error(self, field: str | None, reason: str) -> DataError:
        """A ``DataError`` for ``field`` (relative to this record) of this record."""
        return DataError(self.path, self.index, None if field is None else self.prefix + field, reason, self.line)

    def has(self, field: str) -> bool:
        """Whether ``field`` is present and not null."""
        return self.raw.get(field) is not None

    def get(self, field: str) -> Any:
        """The value of a required field."""
        if not self.has(field):
            raise self.error(field, "missing")
        return self.raw[field]

    def sub(self, field: str) -> Record:
        """A required nested object, as a ``Record`` whose errors name ``field.<child>``."""
        return Record(self.get(field), self.path, self.index, f"{self.prefix}{field}.", self.line)

    def text(self, field: str) -> str:
        """A required non-blank string, returned as is."""
        return self.check_text(field, self.get(field))

    def target(self, field: str) -> str:
        """A required non-blank string, stripped (targets and answers)."""
        return self.text(field).strip()

    def optional_target(self, field: str) -> str | None:
        """An optional target (absent or null gives None; present must be a non-blank string)."""
        return self.target(field) if self.has(field) else None

    def case_id(self, default: int) -> str:
        """``case_id`` as a string (int or non-blank str accepted); ``default`` when absent."""
        if not self.has("case_id"):
            return str(default)
        value = self.raw["case_id"]
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
            raise self.error("case_id", f"expected an integer or a non-empty string, got {value!r}")
        return str(value).strip()

    def optional_id(self, field: str) -> str | None:
        """An optional identifier (a non-blank string or an integer, e.g. a Wikidata ``P103``/``Q150``)
        as a stripped string; absent or null gives None."""
        if not self.has(field):
            return None
        value = self.raw[field]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise self.error(field, f"expected a non-empty string or integer id, got {value!r}")
        return str(value).strip()

    def texts(self, field: str, *, required: bool = False) -> tuple[str, ...]:
        """A list of non-blank strings; a single string is taken as a one-element list."""
        if not self.has(field):
            if required:
                raise self.error(field, "missing")
            return ()
        value = self.raw[field]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.error(field, f"expected a string or a list of strings, got {type(value).__name__}")
        return tuple(self.check_text(f"{field}[{i}]", v) for i, v in enumerate(items))

    def check_text(self, field: str, value: Any) -> str:
        """``value`` if it is a non-blank string, else a ``DataError`` naming ``field``."""
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise self.error(field, "empty")
        return value

    def qa_pairs(self, prompts_field: str, answers_field: str) -> tuple[QA, ...]:
        """Parallel lists (or single strings) of prompts and answers, zipped into ``QA``s."""
        prompts = self.texts(prompts_field, required=True)
        answers = self.texts(answers_field, required=True)
        if len(prompts) != len(answers):
            raise self.error(answers_field,
                             f"{len(answers)} answer(s) for {len(prompts)} prompt(s) in {prompts_field!r}")
        return tuple(QA(p, a.strip()) for p, a in zip(prompts, answers))

    def qa_items(self, field: str, default_answer: str | None) -> tuple[QA, ...]:
        """A list whose items are objects ``{prompt, answer}`` (``target`` accepted for ``answer``)
        or plain prompt strings, which take ``default_answer`` (an error when it is None)."""
        if not self.has(field):
            return ()
        value = self.raw[field]
        if not isinstance(value, list):
            raise self.error(field, f"expected a list, got {type(value).__name__}")
        pairs = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                entry = Record(item, self.path, self.index, f"{self.prefix}{field}[{i}].")
                answer = "target" if entry.has("target") and not entry.has("answer") else "answer"
                pairs.append(QA(entry.text("prompt"), entry.target(answer)))
            elif default_answer is None:
                raise self.error(f"{field}[{i}]", "expected an object {prompt, answer}")
            else:
                pairs.append(QA(self.check_text(f"{field}[{i}]", item), default_answer))
        return tuple(pairs)

    def template(self, prompt_field: str, subject: str) -> str:
        """The template of a literal prompt: the first occurrence of ``subject`` replaced by ``{}``."""
        prompt = self.text(prompt_field)
        return literal_to_template(prompt, subject, lambda reason: self.error(prompt_field, reason))

    def given_template(self, prompt_field: str) -> str:
        """A prompt that must already be a template with exactly one ``{}``."""
        prompt = self.text(prompt_field)
        if prompt.count("{}") != 1:
            found = prompt.count("{}")
            raise self.error(prompt_field, f"a template needs exactly one '{{}}', found {found}: {prompt!r}")
        return prompt


def literal_to_template(prompt: str, subject: str, error: Callable[[str], Exception]) -> str:
    """Replace the first occurrence of ``subject`` in ``prompt`` by ``{}``.

    Raises:
        whatever ``error(reason)`` returns, when the subject is absent or the prompt holds ``{}`` already.
    """
    if "{}" in prompt:
        raise error(f"a literal prompt must not contain '{{}}': {prompt!r}")
    at = prompt.find(subject)
    if at < 0:
        raise error(f"does not contain the subject {subject!r}: {prompt!r}")
    if prompt.count(subject) > 1:
        log.debug("subject %r occurs more than once in %r; using the first occurrence", subject, prompt)
    return prompt[:at] + "{}" + prompt[at + len(subject):]


def build(kind: str, path: Path, raw: Sequence[Any], parse: Callable[[Record], EditRequest], *,
          limit: int | None, offset: int, skip_invalid: bool) -> LoadedData:
    """Select ``raw[offset:offset + limit]``, parse each record, skip or raise on invalid ones.

    Args:
        raw: the file's records in order; an element may be an exception (a line that failed to
            parse), which is raised or skipped like any invalid record.
        parse: turns a ``Record`` into an ``EditRequest``, raising ``DataError`` when invalid.

    Raises:
        ValueError: negative ``offset`` or ``limit``.
        DataError: the first invalid record, unless ``skip_invalid``.
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    stop = len(raw) if limit is None else min(len(raw), offset + limit)
    requests: list[EditRequest] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for index in range(offset, stop):
        try:
            item, line = raw[index], None
            if isinstance(item, Located):
                item, line = item.value, item.line
            if isinstance(item, DataError):
                raise item
            record = Record(item, path, index, line=line)
            request = parse(record)
            if request.case_id in seen:
                raise record.error("case_id", f"duplicate {request.case_id!r} (also record {seen[request.case_id] + 1})")
        except DataError as exc:
            if not skip_invalid:
                raise
            skipped.append(Skipped(index, exc.field, exc.reason))
            log.info("skipping invalid record: %s", exc)
            continue
        seen[request.case_id] = index
        requests.append(request)
    if skipped:
        log.warning("%s: skipped %d invalid record(s) of %d selected", path, len(skipped), max(stop - offset, 0))
    return LoadedData(kind, path, tuple(requests), tuple(skipped), offset, len(raw))


def read_json_array(path: Path) -> list[Any]:
    """The records of a JSON file whose top level is an array.

    Raises:
        FileNotFoundError: no such file.
        DataError: not valid JSON, or not an array (index None).
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, None, None, f"not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON array of records, got {type(data).__name__}")
    return data


def make_request(record: Record, **fields: Any) -> EditRequest:
    """``EditRequest(**fields)``, turning its own checks' ``ValueError`` into a ``DataError``."""
    try:
        return EditRequest(**fields)
    except ValueError as exc:
        raise record.error(None, str(exc)) from exc
