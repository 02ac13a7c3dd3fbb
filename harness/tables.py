r"""Table files: CSV written record by record (flush + fsync), resumable, and read back exactly.

``RowTable`` is the one writer of every appended table: a fixed header decided before the first row,
each row flushed and fsynced as soon as it is known, and on reopening a torn last record (SIGKILL in
the middle of a write) is cut off, the rows already there are read back, rows that repeat a key
(written twice by an older version or by two processes at once) are dropped, keeping the first,
and a row whose key is already recorded is never written again.

Cells hold any text exactly. The files are RFC 4180 CSV (UTF-8, records end in ``\n``, a cell
holding ``,``, ``"``, ``\r`` or ``\n`` is quoted), read back by ``csv.reader`` over lines split on
``\n`` alone, never ``str.splitlines`` (which also breaks at U+2028, U+0085, form feeds ...).
``RowTable``, ``read_rows`` and ``read_frame`` (hence ``harness.collect``) share that one reader,
``_scan``; ``write_csv`` and ``write_frame`` write whole tables atomically with the same cells.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """An existing table in the run directory was written by a different configuration."""


_QUOTE = re.compile(r'[,"\r\n]')
_SURROGATE = re.compile("[\ud800-\udfff]")


def _cell(value: Any) -> str:
    r"""One CSV cell: None -> empty, floats at full precision, text as it is.

    Lone surrogates (``"\ud800"``, from a bad ``\u`` escape in JSON data) are not Unicode text and
    cannot be written as UTF-8: they become U+FFFD. Everything else is kept exactly.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value))  # float(): numpy floats repr as "np.float64(...)"
    return _SURROGATE.sub("\ufffd", str(value))


def _record(values: Sequence[str]) -> str:
    r"""One CSV record ending in ``\n``.

    A cell is quoted (``"`` doubled) when it holds ``,``, ``"``, ``\r`` or ``\n``, or when it is the
    only cell and empty (an empty line reads as no record). Written by hand because ``csv.writer``
    with ``lineterminator="\n"`` leaves a lone ``\r`` unquoted, which reads back as a line break.
    """
    cells = ['"' + v.replace('"', '""') + '"' if _QUOTE.search(v) or (v == "" and len(values) == 1) else v
             for v in values]
    return ",".join(cells) + "\n"


def _allow_fields(size: int) -> None:
    """Raise ``csv.field_size_limit`` (131072 by default) to ``size`` characters if it is lower.

    The limit is process-wide; it is only ever raised, to what a file being read needs.
    """
    need = min(size + 1, 2**31 - 1)  # a C long on every platform
    if csv.field_size_limit() < need:
        csv.field_size_limit(need)


@dataclass
class _Scan:
    """What ``_scan`` found in a table file.

    Attributes:
        records: the header, then each complete row (a row has exactly as many cells as the header).
        size: bytes of the file those records take; the rest is a torn or malformed tail.
        problem: why reading stopped before the end of the file, or None (a torn last line or
            record, what a kill in the middle of a write leaves, is not a problem).
        line: the line where ``problem`` starts.
    """

    records: list[list[str]]
    size: int
    problem: str | None = None
    line: int = 0


def _scan(data: bytes) -> _Scan:
    r"""Parse a table file's bytes: complete records, then where the torn or malformed part begins.

    The file is split into lines on ``\n`` alone and parsed by ``csv.reader`` (a quoted cell may
    span lines). A last line without ``\n`` is torn. A last record that ends inside a quoted cell,
    or that is complete but has the wrong number of cells, is torn too: appends are whole records,
    so only the last one can be cut short. A bad record followed by others is a ``problem``.
    """
    good = data[: data.rfind(b"\n") + 1]  # a torn last line has no newline yet
    try:
        text = good.decode("utf-8")
    except UnicodeDecodeError as exc:
        cut = good.rfind(b"\n", 0, exc.start) + 1
        found = _scan(good[:cut])
        found.problem = found.problem or f"bytes that are not UTF-8 at offset {exc.start}"
        found.line = found.line or good.count(b"\n", 0, cut) + 1
        return found
    _allow_fields(len(text))
    end = 0  # characters of `text` consumed by the reader so far

    def lines() -> Iterator[str]:
        nonlocal end
        while end < len(text):
            start, end = end, text.index("\n", end) + 1
            yield text[start:end]

    records: list[list[str]] = []
    done = 0  # characters of the complete records
    reader = csv.reader(lines(), strict=True)
    problem = None
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problem = f"unreadable CSV ({exc})"
            break
        if records and len(cells) != len(records[0]):
            problem = f"a row of {len(cells)} cells under a header of {len(records[0])}"
            break
        records.append(cells)
        done = end
    if problem is not None and end >= len(text):
        problem = None  # the last record: torn by a kill mid-write, not corrupt
    line = text.count("\n", 0, done) + 1 if problem else 0
    size = len(good) if done == len(text) else len(text[:done].encode("utf-8"))
    return _Scan(records, size, problem, line)


def _first_of_each_key(rows: list[dict[str, str]], key: Sequence[str]) -> tuple[list[dict[str, str]], int]:
    """``rows`` without the later rows of a repeated key; and how many were dropped."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for row in rows:
        k = tuple(row[c] for c in key)
        if k not in seen:
            seen.add(k)
            kept.append(row)
    return kept, len(rows) - len(kept)


class RowTable:
    """An append-only CSV table keyed by some of its columns.

    Args:
        path: the CSV file; created with ``columns`` as header, or reopened (resume).
        columns: the header, fixed for the table's life.
        key: columns whose values identify a row; ``append`` skips a row whose key is recorded.

    Raises:
        ResumeError: the existing file has a different header, or a malformed row before its last
            one (a torn last row is cut off, with a warning).
    """

    def __init__(self, path: str | Path, columns: Sequence[str], key: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.key = list(key)
        missing = [k for k in self.key if k not in self.columns]
        if missing or len(set(self.columns)) != len(self.columns):
            raise ValueError(f"{self.path.name}: bad columns/key ({missing or 'duplicate column names'})")
        self.rows: list[dict[str, str]] = []
        self._keys: set[tuple[str, ...]] = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._reopen()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line(self.columns, mode="w")

    # -- reading back ----------------------------------------------------------------------------
    def _reopen(self) -> None:
        data = self.path.read_bytes()
        found = _scan(data)
        if found.problem:
            raise ResumeError(
                f"{self.path}, line {found.line}: {found.problem}, and rows after it; the file was changed "
                "by something other than this harness. Repair or remove it, or choose a fresh run directory")
        if not found.records:
            self._truncate(0)
            self._write_line(self.columns, mode="w")
            return
        header = found.records[0]
        if header != self.columns:
            extra, lack = sorted(set(header) - set(self.columns)), sorted(set(self.columns) - set(header))
            raise ResumeError(
                f"{self.path} was written with other columns (only there: {extra}; only now: {lack}); "
                "resume with the same command, or choose a fresh run directory")
        rows = [dict(zip(self.columns, values)) for values in found.records[1:]]
        self.rows, dropped = _first_of_each_key(rows, self.key)
        self._keys = {tuple(row[k] for k in self.key) for row in self.rows}
        if found.size != len(data):
            log.warning("%s: cut %d bytes of a torn last row", self.path.name, len(data) - found.size)
        if dropped:  # rewritten whole (atomically): the torn tail goes too
            log.warning("%s: dropped %d duplicate row(s) (a key written twice, by an older version or by two "
                        "processes at once); kept the first of each key", self.path, dropped)
            write_csv(self.path, self.columns, self.rows)
        elif found.size != len(data):
            self._truncate(found.size)

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())

    # -- writing ---------------------------------------------------------------------------------
    def _write_line(self, values: Sequence[str], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8", newline="") as f:
            f.write(_record(values))
            f.flush()
            os.fsync(f.fileno())

    def key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The key of ``row`` as it reads back from the file."""
        return tuple(_cell(row.get(k)) for k in self.key)

    def has(self, row: Mapping[str, Any]) -> bool:
        """Whether a row with the key of ``row`` (a mapping holding at least the key columns) is recorded."""
        return self.key_of(row) in self._keys

    def append(self, row: Mapping[str, Any]) -> bool:
        """Write ``row`` (flush + fsync) unless its key is recorded; unknown keys are an error.

        Returns:
            True when written, False when the key was already there.
        """
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise KeyError(f"{self.path.name}: columns {unknown} are not in the header")
        key = self.key_of(row)
        if key in self._keys:
            return False
        values = [_cell(row.get(c)) for c in self.columns]
        self._write_line(values)
        self.rows.append(dict(zip(self.columns, values)))
        self._keys.add(key)
        return True


def _read(path: str | Path, key: Sequence[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows of a table, read-only; see ``read_rows``."""
    path = Path(path)
    found = _scan(path.read_bytes())
    if found.problem:
        log.warning("%s, line %d: %s; reading the rows before it", path, found.line, found.problem)
    if not found.records:
        return [], []
    header = found.records[0]
    rows = [dict(zip(header, values)) for values in found.records[1:]]
    if key:
        rows, dropped = _first_of_each_key(rows, key)
        if dropped:
            log.warning("%s: left out %d duplicate row(s) (kept the first of each key)", path, dropped)
    return header, rows


def read_rows(path: str | Path, key: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The complete rows of a table, read-only, each cell exactly as written.

    Args:
        path: a CSV table written by ``RowTable`` or ``write_csv``.
        key: when given, only the first row of each key (older files may hold duplicates).

    Returns:
        One dict (column -> cell text) per row; a torn last record is left out, and so is
        everything from a malformed row on (with a warning).
    """
    return _read(path, key)[1]


def read_frame(path: str | Path, key: Sequence[str] | None = None) -> "pd.DataFrame":
    """A table as a DataFrame: ``read_rows``, then types as ``pandas.read_csv`` infers them.

    Empty cells are missing values; a column whose other cells are all numbers is numeric, one of
    only ``true``/``false`` is boolean, and anything else stays text, exactly as written.
    """
    import pandas as pd

    header, rows = _read(path, key)
    columns = {}
    for c in header:
        cells = pd.Series([r[c] if r[c] != "" else None for r in rows], dtype=object)
        present = cells.dropna()
        if len(present) and present.str.lower().isin(["true", "false"]).all():
            cells = cells.map(lambda v: v if v is None else v.lower() == "true")
            columns[c] = cells.astype(bool) if cells.notna().all() else cells
            continue
        try:
            columns[c] = pd.to_numeric(cells)
        except (ValueError, TypeError):
            columns[c] = cells
    return pd.DataFrame(columns, columns=header)


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a whole CSV file atomically (for tables rewritten at once, not appended)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(_record(list(columns)))
        for row in rows:
            f.write(_record([_cell(row.get(c)) for c in columns]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_frame(path: str | Path, df: "pd.DataFrame") -> None:
    """Write a DataFrame as a table (``write_csv``: same cells and quoting; missing values empty)."""
    records = [{c: None if v is None or (isinstance(v, float) and math.isnan(v)) else v for c, v in r.items()}
               for r in df.to_dict("records")]
    write_csv(path, [str(c) for c in df.columns], records)
