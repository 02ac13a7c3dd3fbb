"""Table files (``harness.tables`` via ``harness.results``): any text round-trips, big cells, torn
records, duplicate keys, and ``harness.collect`` reading the same way.

Written -> reopened (resume) -> ``read_rows`` -> ``collect``: every cell must come back exactly,
including the characters ``str.splitlines`` breaks at, quotes, commas, ``\\r`` and ``\\n``.
"""
from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.collect import collect, collect_retention
from harness.results import ResumeError, RowTable, read_frame, read_rows, write_csv

COLUMNS = ["k", "a", "b"]
# What str.splitlines() breaks at, and what CSV must quote.
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\n", "\r\n", '"', ",", '""']
# Lone surrogates (category Cs) cannot be written as UTF-8 at all; they are written as U+FFFD.
TEXT = (st.lists(st.one_of(st.sampled_from(SEPARATORS), st.characters(exclude_categories=("Cs",))), max_size=20)
        .map("".join) | st.text())


def write_table(path: Path, cells: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Append one row per (a, b) with key k = its index; returns the rows as they must read back."""
    table = RowTable(path, COLUMNS, ["k"])
    expected = []
    for i, (a, b) in enumerate(cells):
        assert table.append({"k": i, "a": a, "b": b})
        expected.append({"k": str(i), "a": a, "b": b})
    assert table.rows == expected
    return expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=st.lists(st.tuples(TEXT, TEXT), max_size=6), torn=st.integers(min_value=1, max_value=40))
def test_any_text_round_trips_through_resume_and_read_rows(cells: list[tuple[str, str]], torn: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.csv"
        expected = write_table(path, cells)
        intact = path.read_bytes()
        assert read_rows(path) == expected
        again = RowTable(path, COLUMNS, ["k"])  # resume
        assert again.rows == expected and all(again.has({"k": i}) for i in range(len(cells)))
        assert path.read_bytes() == intact  # nothing cut from a complete file

        # a kill in the middle of the next append: any prefix of its bytes is left behind
        nxt = {"k": "next", "a": "x\n\u2028\"y", "b": cells[0][0] if cells else "z\r"}
        RowTable(path, COLUMNS, ["k"]).append(nxt)
        record = path.read_bytes()[len(intact):]
        path.write_bytes(intact + record[:min(torn, len(record) - 1)])
        assert read_rows(path) == expected
        resumed = RowTable(path, COLUMNS, ["k"])
        assert resumed.rows == expected and path.read_bytes() == intact
        assert resumed.append(nxt) and read_rows(path) == [*expected, nxt]


def cases_table(path: Path, run_id: str, model: str, error: str) -> None:
    """A minimal cases.csv as the runner writes it (two cases, one metric)."""
    table = RowTable(path, ["run_id", "model", "algorithm", "case_id", "point", "step", "status", "error", "edit_s",
                            "pre_efficacy_score", "post_efficacy_score"], ["case_id", "point", "step"])
    for i in range(2):
        table.append({"run_id": run_id, "model": model, "algorithm": "direct", "case_id": f"c{i}", "point": "edit",
                      "step": 1, "status": "ok", "error": error, "edit_s": 0.5, "pre_efficacy_score": 0.25,
                      "post_efficacy_score": float(i)})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_id=TEXT, model=TEXT, error=TEXT)
def test_any_text_round_trips_through_collect(run_id: str, model: str, error: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cases_table(root / "r" / "cases.csv", run_id, model, error)
        assert [r["error"] for r in read_rows(root / "r" / "cases.csv")] == [error, error]
        df = collect(root)
        assert set(df["run_id"]) == {run_id} and set(df["model"]) == {model}
        assert set(df.query("phase == 'post'")["mean"]) == {0.5} and set(df["n_cases"]) == {2}
        back = read_rows(root / "collected.csv")
        assert back and all(r["run_id"] == run_id and r["model"] == model for r in back)


def test_megabyte_cells_read_back(tmp_path: Path) -> None:
    csv.field_size_limit(131072)  # the default, in case an earlier test raised it
    big = "\u2028x,\"\n" * 250_000  # 1 MB of characters
    path = tmp_path / "t.csv"
    expected = write_table(path, [(big, "small"), ("", big[::-1])])
    assert read_rows(path) == expected
    assert RowTable(path, COLUMNS, ["k"]).rows == expected
    assert read_frame(path)["a"].tolist()[0] == big


@pytest.mark.parametrize("tail", [b'2,"x', b'2,"x\n', b'2,"x\n\ny"', b'2,"x\n\ny",', b'2,"x\n\ny","1\n2'])
def test_torn_record_after_quoted_multiline_cells(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "t.csv"
    expected = write_table(path, [("a\nb", "c\r\nd"), ("\n", '"\n"')])
    intact = path.read_bytes()
    path.write_bytes(intact + tail)
    assert read_rows(path) == expected
    table = RowTable(path, COLUMNS, ["k"])
    assert table.rows == expected and path.read_bytes() == intact
    assert table.append({"k": 2, "a": "x\n\ny", "b": "1\n2"})
    assert read_rows(path)[-1] == {"k": "2", "a": "x\n\ny", "b": "1\n2"}


def test_duplicate_keys_are_dropped_on_resume(tmp_path: Path, caplog) -> None:
    path = tmp_path / "t.csv"
    expected = write_table(path, [("first", "1"), ("second", "2\n2")])
    with open(path, "a", encoding="utf-8", newline="") as f:  # what two writers (or an old version) left
        f.write('0,again,x\n1,"again\n",y\n0,third,z\n2,new,\n')
    assert len(read_rows(path)) == 6 and read_rows(path, key=["k"])[:2] == expected
    with caplog.at_level(logging.WARNING):
        table = RowTable(path, COLUMNS, ["k"])
    assert "3 duplicate row(s)" in caplog.text
    assert table.rows == [*expected, {"k": "2", "a": "new", "b": ""}]
    assert read_rows(path) == table.rows  # rewritten without them
    assert not table.append({"k": 0, "a": "later"})
    assert not list(tmp_path.glob("*.tmp"))


def test_malformed_row_before_the_last_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    expected = write_table(path, [("a", "b")])
    with open(path, "a", encoding="utf-8") as f:
        f.write("1,only two\n2,c,d\n")
    before = path.read_bytes()
    with pytest.raises(ResumeError, match=r"t\.csv, line 3: a row of 2 cells"):
        RowTable(path, COLUMNS, ["k"])
    assert path.read_bytes() == before  # refused, not cut
    assert read_rows(path) == expected  # read-only: the rows before it


def test_write_csv_quotes_carriage_returns(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    rows = [{"x": "a\rb", "y": 1.5}, {"x": "", "y": None}]
    write_csv(path, ["x", "y"], rows)
    assert read_rows(path) == [{"x": "a\rb", "y": "1.5"}, {"x": "", "y": ""}]


def test_collect_retention_reads_torn_and_duplicated_tables(tmp_path: Path) -> None:
    run = tmp_path / "seq"
    cases_table(run / "cases.csv", "seq", "tiny", "")
    ret = RowTable(run / "retention.csv", ["step", "n_edits", "efficacy_score", "outlier"], ["step"])
    for step in (1, 2):
        ret.append({"step": step, "n_edits": 2 * step, "efficacy_score": step / 4, "outlier": step == 2})
    with open(run / "retention.csv", "a", encoding="utf-8") as f:
        f.write("1,2,0.9,true\n3,6,0.")  # a duplicate step and a torn row
    df = collect_retention(tmp_path)
    assert df["n_edits"].tolist() == [2, 4] and df["efficacy_score"].tolist() == [0.25, 0.5]
    assert df["outlier"].tolist() == [False, True] and df["base_efficacy_score"].tolist() == [0.25, 0.25]
    assert read_rows(tmp_path / "retention_collected.csv")[1]["outlier"] == "true"
