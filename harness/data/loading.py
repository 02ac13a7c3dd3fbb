"""The one entry point the runner uses: ``load_requests(kind, path)`` -> ``LoadedData``, and the
samples shipped inside the package (``path=None``).

Kinds and their readers:
    counterfact       CounterFact, EasyEdit JSON layout       (harness.data.counterfact)
    counterfact_rome  CounterFact, ROME/MEMIT JSON layout     (harness.data.counterfact)
    zsre              zsRE, MEND JSON layout                  (harness.data.zsre)
    jsonl, csv, user  your own requests                       (harness.data.user)
The samples are described in ``harness/data/samples/README.md``; nothing here reads outside the
package unless given a path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.data.common import LoadedData, Record, build, read_json_array
from harness.data.counterfact import parse_easyedit, parse_rome
from harness.data.user import parse_user, read_user
from harness.data.zsre import parse_zsre
from harness.types import EditRequest

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

#: kind -> file name of its shipped sample under ``SAMPLES_DIR``; ``counterfact_rome`` has none
#: (no file of that layout may be redistributed here; give a path).
SAMPLES: dict[str, str] = {
    "counterfact": "counterfact-sample.json",
    "zsre": "zsre-sample.json",
    "jsonl": "user-example.jsonl",
    "user": "user-example.jsonl",
    "csv": "user-example.csv",
}

_Reader = Callable[[Path], list[Any]]
_READERS: dict[str, tuple[_Reader, Callable[[Record], EditRequest]]] = {
    "counterfact": (read_json_array, parse_easyedit),
    "counterfact_rome": (read_json_array, parse_rome),
    "zsre": (read_json_array, parse_zsre),
    "jsonl": (lambda p: read_user(p, "jsonl"), parse_user),
    "csv": (lambda p: read_user(p, "csv"), parse_user),
    "user": (lambda p: read_user(p, "user"), parse_user),
}

#: every accepted ``kind``.
KINDS: tuple[str, ...] = tuple(_READERS)


def sample_path(kind: str) -> Path:
    """The shipped sample file for ``kind``.

    Raises:
        ValueError: an unknown kind, or one without a shipped sample (``counterfact_rome``).
        FileNotFoundError: the sample is missing from this installation.
    """
    _check_kind(kind)
    if kind not in SAMPLES:
        raise ValueError(f"no sample is shipped for kind {kind!r}; give the path of a data file")
    path = SAMPLES_DIR / SAMPLES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"the {kind} sample is missing from this installation: {path}")
    return path


def load_requests(kind: str, path: str | Path | None = None, *, limit: int | None = None, offset: int = 0,
                  skip_invalid: bool = False) -> LoadedData:
    """Read edit requests from a data file.

    Args:
        kind: one of ``KINDS``.
        path: the data file; None reads the shipped sample of ``kind``.
        limit: read at most this many records (None: to the end).
        offset: skip this many records first. ``offset`` and ``limit`` select records by position
            in the file before validation, so a given window always means the same cases.
        skip_invalid: leave out invalid records (listed in ``LoadedData.skipped`` and logged)
            instead of raising.

    Returns:
        ``LoadedData`` with the window's valid requests in file order; iterating it yields them.

    Raises:
        ValueError: unknown kind, negative ``offset``/``limit``, no sample for ``kind``.
        FileNotFoundError: ``path`` does not exist.
        DataError: a malformed file, or (unless ``skip_invalid``) the first invalid record; the
            message names the file, the 0-based record index and the field.
    """
    _check_kind(kind)
    file = sample_path(kind) if path is None else Path(path)
    reader, parse = _READERS[kind]
    loaded = build(kind, file, reader(file), parse, limit=limit, offset=offset, skip_invalid=skip_invalid)
    log.debug("%s: %d request(s) from records %d.. of %d", file, len(loaded), offset, loaded.total)
    return loaded


def _check_kind(kind: str) -> None:
    if kind not in _READERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
