"""The paper presets (conf/experiment/paper_*.yaml): each composes with the anchors' settings and
the published numbers beside it, and ``python -m harness.presets`` dry-runs it: exit 0 against a
fake model directory and data/RS files, exit 2 naming every missing path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.cli import compose_config, to_config
from harness.config import CONF_DIR
from harness.presets import dry_run, main, preset_names

# preset -> (model family, settings that must resolve, published numbers the file must quote)
EXPECTED = {
    "paper_rome": ("gpt2", {"algorithm.hparams.layer": 17, "algorithm.hparams.stats.ridge": 0.0, "batch_size": 1,
                            "algorithm.hparams.key_mode": "original",
                            "keep_original_weight": True},
                   ["ES 100.0 / PS 96.4 / NS 75.4", "GE 621.9", "RS 41.9"]),
    "paper_ft": ("gpt2", {"algorithm.hparams.layers": [0], "algorithm.hparams.norm_constraint": 5e-4,
                          "algorithm.hparams.include_bias": True},
                 ["FT+L", "ES 99.1 / PS 48.7 / NS 70.3", "GE 621.4", "RS 37.4"]),
    "paper_memit": ("gptj", {"algorithm.hparams.layers": [3, 4, 5, 6, 7, 8],
                             "algorithm.hparams.mom2_update_weight": 15000.0, "batch_size": 10000,
                             "data.limit": 10000, "keep_original_weight": True},
                    ["ES 98.9 / PS 88.6 / NS 73.7", "GE 619.9", "RS 40.1"]),
    "paper_alphaedit": ("llama", {"algorithm.hparams.layers": [4, 5, 6, 7, 8], "batch_size": 100,
                                  "data.limit": 2000, "keep_original_weight": False},
                        ["ES 98.90 / PS 94.22 / NS 67.88", "GE 622.49", "RS 32.40"]),
}


@pytest.fixture
def files(tmp_path):
    """A fake model directory, a ROME-layout data file and RS files: the overrides a dry run needs."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for name in ("counterfact.json", "idf.npy", "tfidf_vocab.json", "attribute_snippets.json"):
        (tmp_path / name).write_text("[]")
    return [f"model.source={model}", f"data.path={tmp_path / 'counterfact.json'}",
            f"probes.consistency_idf={tmp_path / 'idf.npy'}", f"probes.consistency_vocab={tmp_path / 'tfidf_vocab.json'}",
            f"probes.consistency_snippets={tmp_path / 'attribute_snippets.json'}"]


def test_every_preset_is_covered():
    assert preset_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_composes_with_the_anchors_settings(name, files):
    family, settings, published = EXPECTED[name]
    cfg = compose_config([f"experiment={name}", *files])
    conf = to_config(cfg)  # typed: every hyperparameter name exists
    assert cfg.model.family == family and cfg.algorithm.family == family
    for key, value in settings.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert conf.dtype == "float32" and conf.data.kind == "counterfact_rome"
    assert conf.probes.metrics == ["counterfact", "fluency", "consistency"]
    assert conf.probes.fluency_max_length == conf.probes.consistency_max_length == 100
    assert conf.probes.fluency_max_prompts is None and conf.probes.consistency_max_prompts is None
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text(encoding="utf-8")
    assert all(p in text for p in published), published


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_passes_against_a_fake_model_dir(name, files, capsys):
    assert main([name, *files]) == 0
    out = capsys.readouterr().out
    assert "dtype: float32" in out and f"python -m harness experiment={name}" in out
    text, problems = dry_run(name, files)
    assert problems == [] and "consistency_snippets:" in text


def test_dry_run_names_what_is_missing(files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["paper_memit", f"model.source={empty}", files[1]]) == 2
    err = capsys.readouterr().err
    assert f"model.source: {str(empty)!r} has no config.json" in err
    assert "probes.consistency_idf: not set" in err and "probes.consistency_snippets: not set" in err
    assert "data.path" not in err  # given
    _, problems = dry_run("paper_rome", [f"model.source={tmp_path / 'nope'}", f"data.path={tmp_path / 'x.json'}"])
    assert problems[:2] == [f"model.source: model directory {str(tmp_path / 'nope')!r} not found",
                            f"data.path: file {str(tmp_path / 'x.json')!r} not found (the counterfact_rome data file)"]
    _, problems = dry_run("paper_rome", [])
    assert problems[0] == "model.source: not set (mandatory value ???)"
    assert main(["paper_nope"]) == 2 and "unknown preset 'paper_nope'" in capsys.readouterr().err


def test_the_command_line_exits_2_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.presets", "paper_alphaedit",
                           f"model.source={tmp_path}"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 2
    assert f"model.source: {str(tmp_path)!r} has no config.json" in proc.stderr
    assert "model:" in proc.stdout  # the resolved config is printed before the problems
