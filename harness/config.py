"""Typed configuration: the dataclass schemas behind ``conf/`` and their ConfigStore registration.

``conf/config.yaml`` starts its defaults list with ``base_config`` (``Config`` below), so every
top-level key and the ``model``, ``data``, ``probes`` and ``eval`` groups are typed: a misspelled key
or a value of the wrong type fails when Hydra composes the config, before any model is loaded.

Algorithm hyperparameters are typed the same way without the algorithm files having to say so: the
defaults list holds ``algorithm_schema: ${algorithm}`` *before* ``algorithm``, and for every
registered algorithm ``register_configs`` stores an ``algorithm_schema/<name>`` node built from
the algorithm's own ``Hparams`` dataclass, so ``conf/algorithm/<name>.yaml`` merges onto its schema.
An algorithm whose Hparams OmegaConf cannot express (or a yaml without a registered algorithm) gets
an untyped node; ``validate`` then checks its hyperparameters with ``make_hparams`` at startup.

This module imports Hydra only inside ``register_configs``; the dataclasses are plain.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

MISSING = "???"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    """Which model to load (``harness.models.load_model``).

    Attributes:
        source: ``smollm2``, ``tiny``, a local model directory or a ``.gguf`` file.
        name: label used in result tables (defaults to ``source``).
        cache_dir: where converted GGUF models are cached (None: ``$HARNESS_CACHE``).
        trust_remote_code: passed to transformers.
        spec: overrides of the architecture table (``ModelSpec`` fields).
        tiny: keyword arguments of ``tiny_model`` when ``source == "tiny"``.
        weights: a state_dict file overlaid onto the loaded model (``.safetensors``, or a
            ``.pt``/``.pth``/``.bin`` pickle loaded weights-only; see ``harness.weights``).
        weights_strict: refuse a ``weights`` file with missing, unexpected or mis-shaped keys;
            false overlays the keys that fit and logs what it skipped.
    """

    source: str = MISSING
    name: Optional[str] = None
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False
    spec: Optional[Dict[str, Any]] = None
    tiny: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    weights_strict: bool = True


@dataclass
class AlgorithmConfig:
    """A registered algorithm and its hyperparameters (typed by ``algorithm_schema/<name>``)."""

    name: str = MISSING
    hparams: Any = None


@dataclass
class DataConfig:
    """Which edit requests to run (``harness.data.load_requests``).

    Attributes:
        kind: ``counterfact``, ``counterfact_rome``, ``zsre``, ``jsonl`` or ``csv``.
        path: a data file; None uses the shipped sample of ``kind``.
        limit: at most this many requests (None: all).
        offset: skip this many records first.
        skip_invalid: drop malformed records (logged) instead of failing.
    """

    kind: str = MISSING
    path: Optional[str] = None
    limit: Optional[int] = None
    offset: int = 0
    skip_invalid: bool = False


@dataclass
class ProbesConfig:
    """The probe suite (``harness.probes.build_probes``); metrics None means all but fluency."""

    metrics: Optional[List[str]] = None
    batch_size: int = 32
    fluency: bool = False
    fluency_max_new_tokens: int = 32
    fluency_max_prompts: Optional[int] = 2
    seed: int = 0


@dataclass
class EvalConfig:
    """Evaluation schedule of sequential runs.

    Attributes:
        retention_at: edit counts after which every earlier edit is re-evaluated (and the run
            checkpointed); the end of the run is always such a point.
        outlier_factor: a step whose weight-change norm exceeds this many times the running median
            of the earlier steps' norms is flagged as an outlier.
    """

    retention_at: List[int] = field(default_factory=list)
    outlier_factor: float = 10.0


@dataclass
class Config:
    """The whole run configuration (``conf/config.yaml``).

    Attributes:
        keep_original_weight: True: single-edit evaluation (restore after every edit call);
            False: sequential editing (edits accumulate).
        batch_size: requests per edit call.
        save_model: write the final model (safetensors) and the accumulated delta into the run dir.
        seed: seed of torch's generator; each edit call reseeds with (seed, call index).
        device, dtype: ``auto`` or explicit (``cpu``, ``cuda:0``; ``float32``, ``bfloat16`` ...).
        run_id: label in every row (None: derived from the output directory).
        verify_untouched: fingerprint every parameter after each edit (Editor option).
        offload_snapshot: keep snapshots on the CPU (Editor option).
        threads: torch CPU threads (None: torch's default). 1 is much faster on a busy machine and
            for parallel local workers.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    keep_original_weight: bool = True
    batch_size: int = 1
    save_model: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    run_id: Optional[str] = None
    verify_untouched: bool = True
    offload_snapshot: bool = False
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if any(n < 1 for n in self.eval.retention_at):
            raise ValueError(f"eval.retention_at must hold positive edit counts, got {self.eval.retention_at}")


def _hparams_node(cls: type) -> Any:
    """A structured node for ``cls`` when OmegaConf can express it, else None."""
    from omegaconf import OmegaConf

    try:
        OmegaConf.structured(cls)
    except Exception as exc:  # an unsupported annotation: fall back to checking in code
        log.debug("hparams of %s are not expressible as a structured config: %s", cls, exc)
        return None
    return cls


_REGISTERED = False


def register_configs() -> None:
    """Store ``base_config`` and one ``algorithm_schema/<name>`` per algorithm in Hydra's ConfigStore.

    Idempotent. Algorithm yaml files without a registered algorithm get an untyped schema so that
    the config composes and the registry reports the unknown name at startup.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from harness.algorithms import available, get_algorithm

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    names = set(available())
    for name in sorted(names):
        node = _hparams_node(get_algorithm(name).Hparams)
        cs.store(group="algorithm_schema", name=name, package="algorithm",
                 node={"hparams": node} if node is not None else {"hparams": {}})
    for path in sorted((CONF_DIR / "algorithm").glob("*.yaml")):
        if path.stem not in names:
            cs.store(group="algorithm_schema", name=path.stem, package="algorithm", node={"hparams": {}})
    _REGISTERED = True


def validate(cfg: Config) -> Any:
    """Check what the schema cannot: the algorithm exists and its hyperparameters build.

    Returns:
        The algorithm's ``Hparams`` instance.

    Raises:
        KeyError: unknown algorithm (the message lists the registered ones).
        TypeError / ValueError: unknown or invalid hyperparameters.
    """
    from harness.algorithms import get_algorithm, make_hparams

    cls = get_algorithm(cfg.algorithm.name).Hparams
    hp = cfg.algorithm.hparams
    if hp is None:
        hp = {}
    if dataclasses.is_dataclass(hp) and not isinstance(hp, type):
        if not isinstance(hp, cls):
            raise TypeError(
                f"algorithm {cfg.algorithm.name!r}: hparams are {type(hp).__name__}, expected {cls.__name__}")
        return hp
    return make_hparams(cls, dict(hp), where=f"algorithm {cfg.algorithm.name!r}")
