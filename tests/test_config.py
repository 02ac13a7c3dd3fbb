"""The Hydra configuration: every experiment and algorithm file composes into a typed ``Config``, and
misspelled keys or wrongly typed values fail at compose time (Hydra's compose API, no run)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import MissingMandatoryValue

from harness.algorithms import available, get_algorithm, make_hparams
from harness.cli import compose_config, to_config
from harness.config import CONF_DIR, Config, ConfigError, validate

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ALGORITHM_FILES = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
SHRINK = ["data.limit=2", "device=cpu", "dtype=float32"]


def _compose(overrides: list[str]) -> Config:
    return to_config(compose_config(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    # the paper presets need a model path (checked by their dry run, tests/test_presets.py)
    needs = ["model.source=model-dir"] if experiment.startswith("paper_") else []
    cfg = _compose([f"experiment={experiment}", *SHRINK, *needs])
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


# ----------------------------------------------------------------------------------------------
# hyperparameters: nested blocks, one source of defaults, per-family settings

TARGET = dict(num_grad_steps=25, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, loss_layer=None,
              early_stop_loss=0.05)
STATS = dict(source="model", n_samples=1000, seq_len=128, batch_size=16, dtype="float32", ridge=1e-3, seed=0,
             cache_dir=None)
SPREAD = dict(layers=[3, 4, 5, 6, 7], fast_path=True, z_batch_size=16, target=TARGET,
              stats={**STATS, "n_samples": 256}, templates=dict(length_params=[[10, 5]], seed=0))
# What SmolLM2 runs resolved to before the blocks were nested (the flat fields of conf/algorithm/*.yaml,
# v_* -> target.*, mom2_* and stats_dir -> stats.*, context templates -> templates.*).
SMOLLM2_BEFORE = {
    "rome": dict(layer=5, key_mode="r_rome", mom2_adjustment=False, fast_path=True, target=TARGET, stats=STATS,
                 templates=dict(length_params=[[5, 10], [10, 10]], seed=0)),
    "memit": dict(SPREAD, mom2_update_weight=2000.0),
    "alphaedit": dict(SPREAD, nullspace_threshold=0.02, l2=10.0, cache_projector=True, state_dtype="float32"),
    "ft": dict(layers=[20], num_steps=25, lr=5e-4, weight_decay=0.0, norm_constraint=None, batch_size=1, min_loss=0.01,
               include_bias=False, seed=0),
    "lora": dict(target_modules=["self_attn.q_proj", "self_attn.v_proj"], layers=None, rank=8, alpha=32.0, dropout=0.1,
                 lr=2e-4, weight_decay=0.0, num_steps=30, batch_size=1, seed=0),
}
SMOLLM2_BEFORE["ft_m"] = SMOLLM2_BEFORE["ft"]


def _hparams(overrides: list[str]) -> tuple[Config, dict]:
    cfg = _compose(overrides)
    return cfg, dataclasses.asdict(validate(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name", sorted(SMOLLM2_BEFORE))
def test_smollm2_hparams_resolve_to_the_values_before_nesting(name: str) -> None:
    cfg, got = _hparams([f"algorithm={name}"])
    assert (cfg.model.family, cfg.algorithm.family) == ("smollm2", None if name == "lora" else "smollm2")
    want = _flat(SMOLLM2_BEFORE[name])
    got = _flat(got)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == value and type(got[key]) is type(value), (name, key, got[key], value)


def test_dataclass_defaults_are_the_defaults() -> None:
    """Without a family (the tiny model), an algorithm resolves to its dataclass's defaults."""
    for name in ("rome", "memit", "alphaedit", "ft", "ft_m", "lora"):
        cfg, got = _hparams(["model=tiny", f"algorithm={name}"])
        assert cfg.model.family is None and cfg.algorithm.family is None
        assert got == dataclasses.asdict(get_algorithm(name).Hparams()), name


def _restated(values: dict, default: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``values`` whose value equals the default (should be empty)."""
    same = []
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            same += _restated(v, default[k], f"{prefix}{k}.")
        elif default.get(k) == v:
            same.append(prefix + k)
    return same


def test_yaml_restates_no_default() -> None:
    """conf/algorithm/*.yaml and conf/algorithm_family/*/*.yaml set only what differs from the defaults."""
    from omegaconf import OmegaConf

    files = [*(CONF_DIR / "algorithm").glob("*.yaml"), *(CONF_DIR / "algorithm_family").glob("*/*.yaml")]
    assert len(files) > len(ALGORITHM_FILES)
    for path in files:
        conf = OmegaConf.to_container(OmegaConf.load(path))
        name = conf.get("name", path.parent.name)
        defaults = dataclasses.asdict(get_algorithm(name).Hparams())
        restated = _restated(conf.get("hparams") or {}, defaults)
        assert not restated, f"{path.relative_to(CONF_DIR)} restates the default of {restated}"


FAMILY_FILES = sorted((p.parent.name, p.stem) for p in (CONF_DIR / "algorithm_family").glob("*/*.yaml"))


@pytest.mark.parametrize("name,family", FAMILY_FILES)
def test_every_family_entry_composes_and_is_recorded(name: str, family: str) -> None:
    cfg, _ = _hparams([f"algorithm={name}", f"family={family}"])
    assert (cfg.model.family, cfg.algorithm.family) == (family, family)


# The anchors' values (the files cited in each conf/algorithm_family entry).
ANCHORS = {
    ("gpt2_local", "rome"): {"layer": 17, "mom2_adjustment": True, "target.num_grad_steps": 20, "target.lr": 0.5,
                             "target.weight_decay": 0.5, "target.clamp_norm_factor": 4.0, "target.kl_factor": 0.0625,
                             "target.loss_layer": None, "target.early_stop_loss": 0.05, "stats.ridge": 0.0,
                             "templates.length_params": [[5, 10], [10, 10]]},
    ("gptj_local", "memit"): {"layers": [3, 4, 5, 6, 7, 8], "mom2_update_weight": 15000.0, "target.num_grad_steps": 25,
                              "target.lr": 0.5, "target.weight_decay": 0.5, "target.clamp_norm_factor": 0.75,
                              "target.kl_factor": 0.0625, "target.loss_layer": None,
                              "templates.length_params": [[10, 5]]},
    ("llama_local", "rome"): {"layer": 5, "mom2_adjustment": False, "target.num_grad_steps": 25, "target.lr": 0.5,
                              "target.weight_decay": 1e-3, "target.clamp_norm_factor": 4.0, "target.kl_factor": 0.0625,
                              "templates.length_params": [[5, 10], [10, 10]]},
    ("gpt2_local", "memit"): {"layers": [13, 14, 15, 16, 17], "mom2_update_weight": 20000.0,
                              "target.num_grad_steps": 20, "target.lr": 0.5, "target.weight_decay": 0.5,
                              "target.clamp_norm_factor": 0.75, "target.kl_factor": 0.0625},
    ("llama_local", "memit"): {"layers": [4, 5, 6, 7, 8], "mom2_update_weight": 15000.0, "target.num_grad_steps": 25,
                               "target.lr": 0.1, "target.weight_decay": 0.5, "target.clamp_norm_factor": 0.75,
                               "target.kl_factor": 0.0625},
    ("gpt2_local", "alphaedit"): {"layers": [13, 14, 15, 16, 17], "target.num_grad_steps": 20, "target.lr": 0.5,
                                  "target.weight_decay": 0.5, "target.clamp_norm_factor": 0.75,
                                  "nullspace_threshold": 0.02, "l2": 10.0},
    ("llama_local", "alphaedit"): {"layers": [4, 5, 6, 7, 8], "target.num_grad_steps": 25, "target.lr": 0.1,
                                   "target.weight_decay": 0.5, "target.clamp_norm_factor": 0.75,
                                   "nullspace_threshold": 0.02, "l2": 10.0},
    ("gpt2_local", "ft"): {"layers": [0], "num_steps": 25, "batch_size": 3, "lr": 5e-4, "weight_decay": 0.0,
                           "norm_constraint": 5e-4, "include_bias": True},
    ("llama_local", "ft"): {"layers": [21], "num_steps": 25, "batch_size": 1, "lr": 5e-4, "weight_decay": 0.0,
                            "norm_constraint": None, "include_bias": False},
}
ANCHORS[("llama_local", "wise")] = {"layer": 29, "num_steps": 30, "lr": 0.9, "alpha": 2.0, "beta": 20.0, "gamma": 10.0,
                                    "act_ratio": 0.5, "mask_ratio": 0.2, "norm_constraint": 1.0, "shard_size": 500,
                                    "merge_every": 1000, "merge_density": 0.53, "retrieve": True,
                                    "templates.length_params": [[5, 5], [10, 5]], "project_out": 0,
                                    "margin_weight": 1.0, "relative_routing": False, "live_threshold": False}
ANCHORS[("gpt2_local", "emmet")] = {"layers": [17], "mom2_update_weight": 1000.0, "emmet_lambda": 0.1,
                                    "update_norm_lambda": 0.0, "target.num_grad_steps": 20, "target.lr": 0.5,
                                    "target.weight_decay": 0.5, "target.clamp_norm_factor": 0.75,
                                    "target.kl_factor": 0.0625}
ANCHORS[("llama_local", "emmet")] = {"layers": [5], "mom2_update_weight": 1.0, "emmet_lambda": 0.1,
                                     "update_norm_lambda": 0.0, "target.num_grad_steps": 25, "target.lr": 0.5,
                                     "target.weight_decay": 1e-3, "target.clamp_norm_factor": 4.0,
                                     "target.kl_factor": 0.0625}
ANCHORS[("gpt2_local", "ft_m")] = ANCHORS[("gpt2_local", "ft")]
ANCHORS[("llama_local", "ft_m")] = ANCHORS[("llama_local", "ft")]


@pytest.mark.parametrize("model,name", sorted(ANCHORS))
def test_model_config_selects_the_family_settings(model: str, name: str) -> None:
    cfg, got = _hparams([f"model={model}", "model.source=/models/x", f"algorithm={name}"])
    assert cfg.algorithm.family == cfg.model.family == {"gpt2_local": "gpt2", "gptj_local": "gptj",
                                                        "llama_local": "llama"}[model]
    got = _flat(got)
    assert {k: got[k] for k in ANCHORS[(model, name)]} == ANCHORS[(model, name)]


def test_command_line_wins_over_the_family_entry() -> None:
    _, got = _hparams(["model=gpt2_local", "model.source=/models/x", "algorithm=memit",
                       "algorithm.hparams.layers=[1,2]", "algorithm.hparams.target.num_grad_steps=3",
                       "algorithm.hparams.stats.n_samples=8"])
    assert got["layers"] == [1, 2] and got["target"]["num_grad_steps"] == 3 and got["stats"]["n_samples"] == 8
    assert got["target"]["weight_decay"] == 0.5 and got["mom2_update_weight"] == 20000.0  # the rest of the entry


def test_family_is_chosen_by_the_group_not_by_model_family() -> None:
    assert _compose(["algorithm=rome", "family=llama"]).model.family == "llama"
    with pytest.raises(ValueError, match=r"family=gpt2"):
        _compose(["algorithm=rome", "model.family=gpt2"])


@pytest.mark.parametrize("override", ["algorithm.hparams.target.lrr=0.1", "algorithm.hparams.stats.n_sample=1",
                                      "algorithm.hparams.templates.length=[[1,1]]", "algorithm.hparams.v_lr=0.1"])
def test_misspelled_nested_key_fails_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["algorithm=memit", override])
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        _compose(["algorithm=memit", "+" + override])


@pytest.mark.parametrize("override", ["algorithm.hparams.target.lr=fast", "algorithm.hparams.stats.n_samples=many",
                                      "algorithm.hparams.templates.length_params=[[a,1]]"])
def test_wrong_type_in_a_block_fails_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["algorithm=rome", override])


def test_invalid_value_in_a_block_fails_when_typed() -> None:
    with pytest.raises(ValueError, match="lr"):
        _compose(["algorithm=rome", "algorithm.hparams.target.lr=0"])


def test_make_hparams_builds_blocks_and_names_unknown_nested_keys() -> None:
    from harness.algorithms.memit import MemitHparams

    hp = make_hparams(MemitHparams, {"target": {"lr": 0.1}, "stats": {"seed": 3}, "layers": [1, 2]})
    assert (hp.target.lr, hp.target.num_grad_steps, hp.stats.seed, hp.stats.n_samples) == (0.1, 25, 3, 256)
    with pytest.raises(TypeError, match=r"algorithm 'memit'.*\['target\.lrr'\].*known keys of target:.*'lr'"):
        make_hparams(MemitHparams, {"target": {"lrr": 0.1}}, where="algorithm 'memit'")
    with pytest.raises(TypeError, match=r"\['ops\.0\.scael'\]"):
        make_hparams(get_algorithm("direct").Hparams, {"ops": [{"kind": "low_rank", "param": "p", "scael": 1.0}]})


def test_every_sweep_names_registered_algorithms_and_lifelong_is_the_wise_protocol() -> None:
    import yaml

    for name in EXPERIMENTS:
        raw = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
        swept = (((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}).get("algorithm")
        if swept:
            assert set(str(swept).split(",")) <= set(available()), name
    cfg = _compose(["experiment=lifelong"])
    assert (cfg.keep_original_weight, cfg.batch_size, cfg.data.kind) == (False, 1, "zsre")
    assert list(cfg.eval.retention_at) == [1, 10, 100]
    assert list(cfg.probes.metrics) == ["rewrite_acc", "rephrase_acc", "locality_acc"]
