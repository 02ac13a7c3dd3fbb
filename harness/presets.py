"""Paper presets: list them, or dry-run one (print the resolved config, check that its files exist).

The presets are the experiment files ``conf/experiment/paper_*.yaml``: ROME and FT-L on GPT-2 XL
(Meng et al. 2022), MEMIT on GPT-J (Meng et al. 2023), AlphaEdit on Llama-3-8B-Instruct (Fang et
al. 2025), each with the anchors' hyperparameters and the published numbers in its comments.
Running one needs a GPU, the model and ROME's data files, so check a command first:

    python -m harness.presets                                   # the presets, one line each
    python -m harness.presets paper_rome model.source=/models/gpt2-xl data.path=/data/counterfact.json \
        probes.consistency_idf=/data/idf.npy probes.consistency_vocab=/data/tfidf_vocab.json \
        probes.consistency_snippets=/data/attribute_snippets.json

A dry run composes ``experiment=<preset>`` with the overrides, validates it as a run would
(``harness.cli.to_config``), prints the resolved config, and checks every path it needs: the model
directory (with ``config.json``) or ``.gguf`` file, the data file, the consistency files when the
family is measured, and a statistics corpus when one is given. Exit 0 when all is in place, 2 with
one line per problem otherwise. Nothing is loaded or written.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.cli import compose_config, to_config
from harness.config import CONF_DIR, ConfigError

PREFIX = "paper_"
BUILTIN_MODELS = ("smollm2", "tiny")  # model.source names that are not paths


def preset_names() -> list[str]:
    """The experiment names of the paper presets, sorted."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob(f"{PREFIX}*.yaml"))


def describe(name: str) -> str:
    """The preset's first comment line after its ``@package`` header."""
    for line in (CONF_DIR / "experiment" / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def _need_file(problems: list[str], key: str, value: Any, what: str) -> None:
    if value is None or value == "???":
        problems.append(f"{key}: not set ({what})")
    elif not Path(str(value)).expanduser().is_file():
        problems.append(f"{key}: file {str(value)!r} not found ({what})")


def check_paths(cfg: DictConfig) -> list[str]:
    """What is missing for ``cfg`` to run, one line per problem (empty: all in place)."""
    problems = [f"{key}: not set (mandatory value ???)" for key in sorted(OmegaConf.missing_keys(cfg))]
    source = OmegaConf.select(cfg, "model.source", throw_on_missing=False)
    if source is not None and not OmegaConf.is_missing(cfg.model, "source") and source not in BUILTIN_MODELS:
        path = Path(str(source)).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                problems.append(f"model.source: GGUF file {str(path)!r} not found")
        elif not path.is_dir():
            problems.append(f"model.source: model directory {str(path)!r} not found")
        elif not (path / "config.json").is_file():
            problems.append(f"model.source: {str(path)!r} has no config.json (a Hugging Face model directory)")
    _need_file(problems, "data.path", OmegaConf.select(cfg, "data.path", throw_on_missing=False),
               f"the {cfg.data.kind} data file")
    metrics = OmegaConf.select(cfg, "probes.metrics") or []
    files = (("idf", "ROME's idf.npy"), ("vocab", "ROME's tfidf_vocab.json"),
             ("snippets", "ROME's attribute_snippets.json"))
    if "consistency" in metrics or "essence_score" in metrics:  # essence_score alone reads the snippets only
        for key, what in files if "consistency" in metrics else files[2:]:
            _need_file(problems, f"probes.consistency_{key}",
                       OmegaConf.select(cfg, f"probes.consistency_{key}", throw_on_missing=False), what)
    stats = OmegaConf.select(cfg, "algorithm.hparams.stats.source", throw_on_missing=False)
    if stats not in (None, "model") and "{" not in str(stats):  # per-layer .npz templates are checked at load
        _need_file(problems, "algorithm.hparams.stats.source", stats, "the key-statistics corpus or .npz")
    return problems


def dry_run(name: str, overrides: Sequence[str] = ()) -> tuple[str, list[str]]:
    """The resolved config of preset ``name`` with ``overrides`` (YAML) and its problems.

    Raises:
        ValueError: ``name`` is not a preset.
    """
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    cfg = compose_config([f"experiment={name}", *overrides])
    problems = check_paths(cfg)
    if not OmegaConf.missing_keys(cfg):
        try:
            to_config(cfg)
        except (ConfigError, ValueError, OmegaConfBaseException) as exc:
            problems.insert(0, f"config: {exc}")
    return OmegaConf.to_yaml(cfg, resolve=not OmegaConf.missing_keys(cfg)), problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.presets [PRESET [overrides...]]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n")
        for name in preset_names():
            print(f"  {name:18s} {describe(name)}")
        print("\nusage: python -m harness.presets PRESET [overrides...]   (dry run)")
        return 0
    try:
        text, problems = dry_run(args[0], args[1:])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if problems:
        print(f"error: preset {args[0]} cannot run yet:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(f"dry run: preset {args[0]} is ready: python -m harness experiment={args[0]} {' '.join(args[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
