"""The Hydra configuration: every experiment and algorithm file composes into a typed ``Config``, and
misspelled keys or wrongly typed values fail at compose time (Hydra's compose API, no run)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import MissingMandatoryValue

from harness.algorithms import available
from harness.cli import compose_config, to_config
from harness.config import CONF_DIR, Config, validate

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ALGORITHM_FILES = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
SHRINK = ["data.limit=2", "device=cpu", "dtype=float32"]


def _compose(overrides: list[str]) -> Config:
    return to_config(compose_config(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", *SHRINK])
    assert isinstance(cfg, Config)
    assert cfg.data.limit == 2
    validate(cfg)  # the algorithm exists and its hyperparameters build


def test_experiment_files_are_global_packages() -> None:
    for name in EXPERIMENTS:
        first = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.strip() == "# @package _global_", name


def test_default_config_is_the_main_job() -> None:
    cfg = _compose([])
    got = (cfg.model.source, cfg.algorithm.name, cfg.data.kind, cfg.data.limit)
    assert got == ("smollm2", "rome", "counterfact", 5)
    assert cfg.keep_original_weight is True


def test_sequential_experiment() -> None:
    cfg = _compose(["experiment=sequential"])
    assert cfg.keep_original_weight is False
    assert cfg.batch_size >= 1 and cfg.eval.retention_at


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_every_algorithm_file_composes_and_validates(name: str) -> None:
    cfg = _compose([f"algorithm={name}", *SHRINK])
    assert cfg.algorithm.name == name
    validate(cfg)


def test_every_registered_algorithm_has_a_config_file() -> None:
    assert set(available()) <= set(ALGORITHM_FILES)


def test_algorithm_hparams_are_typed() -> None:
    cfg = _compose(["algorithm=direct", "algorithm.hparams.ops.0.scale=0.5"])
    assert cfg.algorithm.hparams.ops[0].scale == 0.5
    assert type(cfg.algorithm.hparams).__name__ == "DirectHparams"


@pytest.mark.parametrize("override", [
    "keep_orignal_weight=false",           # top level
    "model.sorce=tiny",                    # model
    "data.limt=3",                         # data
    "probes.fluenc=true",                  # probes
    "eval.retention=[1]",                  # eval
    "algorithm.hparams.opz=[]",            # algorithm hyperparameters (direct)
    "algorithm.hparams.ops.0.scael=1.0",   # nested hyperparameters
])
def test_misspelled_key_fails_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["algorithm=direct", override])


@pytest.mark.parametrize("override", ["batch_size=many", "data.limit=abc", "save_model=maybe",
                                      "algorithm.hparams.ops.0.rank=high"])
def test_wrong_type_fails_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["algorithm=direct", override])


def test_unknown_group_option_fails() -> None:
    with pytest.raises(HydraException):
        compose_config(["model=no_such_model"])


@pytest.mark.parametrize("model", ["gpt2_local", "llama_local", "gemma3_local"])
def test_example_models_require_a_source(model: str) -> None:
    with pytest.raises(MissingMandatoryValue):
        _compose([f"model={model}", "algorithm=direct"])
    assert _compose([f"model={model}", "algorithm=direct", "model.source=/models/x"]).model.source == "/models/x"


def test_invalid_values_fail_when_typed() -> None:
    with pytest.raises(ValueError):
        _compose(["algorithm=direct", "batch_size=0"])


def test_validate_checks_untyped_hparams() -> None:
    cfg = _compose(["algorithm=direct"])
    cfg.algorithm.hparams = {"opz": []}
    with pytest.raises(TypeError, match="opz"):
        validate(cfg)
    cfg.algorithm.name = "no_such_algorithm"
    with pytest.raises(KeyError):
        validate(cfg)


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "JoblibLauncher"), ("local", "JoblibLauncher"),
    ("submitit_local", "LocalLauncher"), ("submitit_slurm", "SlurmLauncher"), ("slurm", "SlurmLauncher"),
])
def test_launchers_compose(launcher: str, target: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "algorithm=direct"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert Path(str(cfg.hydra.sweep.dir)).parts[0] == "runs"
