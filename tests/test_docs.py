"""The documentation in ``docs/`` against the code: pages exist for every algorithm and metric, the
hyperparameter tables list every field with the default a run uses, the metric tables carry the
protocol and version the code declares, every cited or linked page exists, and no file cites the
old out-of-tree spec or a development machine's path."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from harness.algorithms import available, get_algorithm
from harness.cli import compose_config
from harness.probes import METRICS, get_probe
from harness.probes.registry import family_of

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = ("harness", "tests", "bench", "conf")
ALGORITHM_PAGES = {"ft_m": "ft.md"}  # pages that document more than one algorithm
PROTOCOL_PAGES = {"counterfact": "counterfact.md", "easyedit": "easyedit.md", "generation": "fluency.md",
                  "wild": "wild.md", "wild_judge": "wild.md", "capability": "capability.md",
                  "consistency": "consistency.md", "essence": "consistency.md"}
CELL_SPLIT = re.compile(r"(?<!\\)\|")


def source_files() -> list[Path]:
    """Text files of the code, tests, benches and configs, and the README."""
    files = [ROOT / "README.md"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()]
    return files


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (escaped ``\\|`` kept inside cells)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            rows.append([c.strip() for c in CELL_SPLIT.split(line[1:-1])])
    return rows


def section(text: str, heading: str) -> str:
    """The body of the level-2 section ``## heading`` (up to the next level-1 or level-2 heading)."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def code_name(cell: str) -> str | None:
    """``name`` for a cell that is exactly one code span, else None."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    return m.group(1) if m else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def same_value(doc: Any, actual: Any) -> bool:
    """A documented default (parsed as YAML) against the composed value. Numbers compare as numbers
    (``5e-4`` is a string to YAML 1.1); a documented mapping may name only some of the fields."""
    if isinstance(doc, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            doc = float(doc)
        except ValueError:
            return False
    if isinstance(doc, bool) or isinstance(actual, bool):
        return doc is actual
    if isinstance(doc, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(doc, actual, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(doc, list) and isinstance(actual, list):
        return len(doc) == len(actual) and all(same_value(a, b) for a, b in zip(doc, actual))
    if isinstance(doc, dict) and isinstance(actual, dict):
        return set(doc) <= set(actual) and all(same_value(v, actual[k]) for k, v in doc.items())
    return doc == actual


# ------------------------------------------------------------------------------------------------
# references from the code to the docs


def test_nothing_cites_the_out_of_tree_spec():
    old = "ALGORITHMS" + ".md"
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in source_files() + list(DOCS.rglob("*.md"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if old in line]
    assert not hits, f"{old} is not in the repository; cite the docs/ page instead: {hits}"


def test_every_docs_path_cited_in_the_code_exists():
    cited = {}
    for p in source_files():
        for m in re.finditer(r"\bdocs/[\w./-]*?\.md\b", p.read_text(encoding="utf-8")):
            cited.setdefault(m.group(0), str(p.relative_to(ROOT)))
    assert len(cited) >= 10, f"expected the code to cite the docs pages, found {sorted(cited)}"
    missing = {path: where for path, where in cited.items() if not (ROOT / path).is_file()}
    assert not missing, f"cited docs pages that do not exist (page: first citing file): {missing}"


def test_no_development_machine_paths():
    pattern = re.compile(r"""["'\s=(](/(work|root|home)/)""")
    me = Path(__file__).resolve()
    files = source_files() + list(DOCS.rglob("*.md"))
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files if p.resolve() != me
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, "absolute paths of a development machine (use ../shared/data beside the repository):\n" + \
        "\n".join(hits)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_resolve():
    pages = list(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    assert len(pages) >= 16
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such file)")
                continue
            if anchor:
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------------------------
# algorithms: a page each, every hyperparameter with the default a run uses


def builtin_algorithms() -> list[str]:
    return [n for n in available() if get_algorithm(n).__module__.startswith("harness.algorithms.")]


def builtin_metrics() -> list[str]:
    """Metrics of the families the harness ships (test modules register toy families too)."""
    return [m for m in METRICS if get_probe(family_of(m)).__module__.startswith("harness.probes.")]


def test_index_lists_every_algorithm_and_metric():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    missing = [n for n in builtin_algorithms() + builtin_metrics() if f"`{n}`" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


@pytest.mark.parametrize("name", builtin_algorithms())
def test_algorithm_page_documents_every_hyperparameter_with_its_default(name):
    page = DOCS / "algorithms" / ALGORITHM_PAGES.get(name, f"{name}.md")
    assert page.is_file(), f"no page for algorithm {name!r}: {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    composed = OmegaConf.to_container(compose_config([f"algorithm={name}"]).algorithm.hparams, resolve=True)
    defaults = flatten(composed or {})
    documented: dict[str, str] = {}
    for cells in table_rows(section(text, "Hyperparameters")):
        key = code_name(cells[0])
        if key is not None:
            assert len(cells) >= 3, f"{page.name}: row {cells} needs a default and a meaning"
            documented[key] = cells[1]
    assert set(documented) == set(defaults), (
        f"{page.relative_to(ROOT)}: hyperparameters not documented {sorted(set(defaults) - set(documented))}, "
        f"documented but not hyperparameters of {name!r} {sorted(set(documented) - set(defaults))}")
    wrong = {}
    for key, cell in documented.items():
        raw = code_name(cell)
        assert raw is not None, f"{page.name}: the default of {key} must be one code span, got {cell!r}"
        if not same_value(yaml.safe_load(raw), defaults[key]):
            wrong[key] = (raw, defaults[key])
    assert not wrong, f"{page.relative_to(ROOT)}: documented defaults differ from the composed config " \
                      f"(documented, actual): {wrong}"


# ------------------------------------------------------------------------------------------------
# metrics: protocol, version, direction and aggregation as the code declares them


@pytest.mark.parametrize("name", builtin_metrics())
def test_metric_row_matches_its_declared_protocol_and_version(name):
    info = METRICS[name]
    assert info.protocol in PROTOCOL_PAGES, f"metric {name}: protocol {info.protocol!r} has no docs page"
    page = DOCS / "metrics" / PROTOCOL_PAGES[info.protocol]
    rows = [r for r in table_rows(page.read_text(encoding="utf-8")) if code_name(r[0]) == name and len(r) == 7]
    assert len(rows) == 1, f"{page.relative_to(ROOT)}: expected one metric row for {name}, found {len(rows)}"
    _, _, _, better, aggregate, protocol, version = rows[0]
    assert better == ("yes" if info.higher_is_better else "no"), (name, better)
    assert f"`{info.aggregate}`" in aggregate, (name, aggregate)
    assert code_name(protocol) == info.protocol, (name, protocol)
    assert version == str(info.version), f"{page.name}: {name} is version {info.version} in the code, {version} here"
    assert f"**Protocol:** `{info.protocol}`, version {info.version}" in page.read_text(encoding="utf-8")
