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
Blocks shared by several algorithms (``target``, ``stats``, ``templates``) are nested dataclasses,
nested nodes here: ``algorithm.hparams.target.lr=0.1``; a typo inside a block fails the same way.

One source of defaults: the ``Hparams`` dataclasses' defaults (SmolLM2-135M's tuned values, the
default model's). ``conf/algorithm/<name>.yaml`` holds the name, the evidence behind the defaults
and only values that differ from them (direct's example operation). Per-model-family settings: a
model file selects its family (``conf/family/<family>.yaml``, which sets ``model.family``), and the
defaults list then merges ``conf/algorithm_family/<algorithm>/<family>.yaml`` (only what that family
changes, citing the reference it comes from) after the algorithm's file and before the experiment
and the command line, which still win. The entry sets ``algorithm.family``, so run.json records
which one was used.

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
CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package; ./conf links here


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
        family: the model family whose algorithm settings apply (``smollm2``, ``gpt2``, ``llama``;
            None: the defaults). Set by the group ``family`` (a model file selects it; ``family=llama``
            on the command line), never directly: the group also selects the settings.
        weights: a state_dict file overlaid onto the loaded model (``.safetensors``, or a
            ``.pt``/``.pth``/``.bin`` pickle loaded weights-only; see ``harness.weights``).
        weights_strict: refuse a ``weights`` file with missing, unexpected or mis-shaped keys;
            false overlays the keys that fit and logs what it skipped.
        device_map: spread the model over the visible accelerators with accelerate (``auto``,
            ``balanced``, ``balanced_low_0``, ``sequential``: accelerate's strategies); None: the
            whole model on ``device``. docs/scale.md.
    """

    source: str = MISSING
    name: Optional[str] = None
    family: Optional[str] = None
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False
    spec: Optional[Dict[str, Any]] = None
    tiny: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    weights_strict: bool = True
    device_map: Optional[str] = None

    def __post_init__(self) -> None:
        if self.device_map not in DEVICE_MAPS:
            raise ValueError(f"model.device_map must be one of {sorted(DEVICE_MAPS - {None})} or null, "
                             f"got {self.device_map!r}")


DEVICE_MAPS = {None, "auto", "balanced", "balanced_low_0", "sequential"}


@dataclass
class AlgorithmConfig:
    """A registered algorithm and its hyperparameters (typed by ``algorithm_schema/<name>``).

    Attributes:
        name: the registered algorithm.
        hparams: its ``Hparams`` (the dataclass defaults, then the yaml, the family entry, the
            experiment and the command line, in that order).
        family: the family whose entry ``conf/algorithm_family/<name>/<family>.yaml`` was merged into
            ``hparams`` (None: no entry, the defaults).
    """

    name: str = MISSING
    hparams: Any = None
    family: Optional[str] = None


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
    """The probe suite (``harness.probes.build_probes``, which takes these keys as they are).

    Attributes:
        metrics: what to measure: registered probe family names (all their metrics; the name of a
            family is its section in ``conf/probes/*.yaml``) and/or single metric names, e.g.
            ``[counterfact, easyedit]`` or ``[efficacy_score, score, rewrite_acc]``. None: the
            families registered as default (``counterfact`` and ``easyedit``).
        batch_size: rows per scorer forward pass (and prompts per generation batch).
        fluency: add the ``fluency`` family (same as naming it in ``metrics``).
        fluency_max_length, fluency_max_prompts: the ``fluency`` family's settings
            (``<family>_<setting>``; see ``harness.probes.fluency.FluencySettings``).
        fluency_short: add the ``fluency_short`` family (the earlier 32-token fluency, its defaults).
        wild_context, wild_margin, wild_judge: the ``wild`` family's settings (see
            ``harness.probes.wild.WildSettings``); used when a config names the family.
            ``wild_judge``: a local causal LM (model directory, ``.gguf``, or ``smollm2``) whose
            verdicts give the ``wild_*_judge`` metrics; null: none (exact match is the fallback).
        capability_corpus, capability_max_tokens, capability_tasks: the ``capability`` family's
            settings (see ``harness.probes.capability.CapabilitySettings``): a text file for
            ``perplexity`` (null: the shipped text), tokens read from it, and a JSONL
            multiple-choice file for ``mc_accuracy`` (null: NaN); used when a config names the family.
        consistency_idf, consistency_vocab, consistency_snippets: the ``consistency`` family's
            reference files (ROME's ``idf.npy``, ``tfidf_vocab.json``, ``attribute_snippets.json``;
            see ``harness.probes.consistency``); used when a config names the family (its
            ``essence_score`` alone reads only the snippets file).
        consistency_max_length, consistency_max_prompts: its generation settings; the probe
            configs set them to the fluency ones (``${.fluency_max_length}``) so both families
            read the same texts.
        seed: the sampling seed of generating families.
    """

    metrics: Optional[List[str]] = None
    batch_size: int = 32
    fluency: bool = False
    fluency_max_length: int = 100
    fluency_max_prompts: Optional[int] = None
    fluency_short: bool = False
    wild_context: str = "question-only"
    wild_margin: int = 5
    wild_judge: Optional[str] = None
    capability_corpus: Optional[str] = None
    capability_max_tokens: int = 1024
    capability_tasks: Optional[str] = None
    consistency_idf: Optional[str] = None
    consistency_vocab: Optional[str] = None
    consistency_snippets: Optional[str] = None
    consistency_max_length: int = 100
    consistency_max_prompts: Optional[int] = None
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
        max_prompt_tokens: longest text (prompt plus answer) a case may hold, in tokens; a longer
            case becomes an error row. None: the model's context length.
        retry_errors: on resume, run the cases recorded with ``status=error`` again (single-edit runs).
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
    max_prompt_tokens: Optional[int] = None
    retry_errors: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2 (or null), got {self.max_prompt_tokens}")
        if any(n < 1 for n in self.eval.retention_at):
            raise ValueError(f"eval.retention_at must hold positive edit counts, got {self.eval.retention_at}")
        if self.algorithm.family is not None and self.algorithm.family != self.model.family:
            raise ValueError(f"model.family={self.model.family!r} but the {self.algorithm.family!r} settings of "
                             f"{self.algorithm.name!r} were merged: choose a family with the group "
                             f"(family={self.model.family}), not with model.family")


class ConfigError(ValueError):
    """A composed config holds a key its schema does not know (e.g. a misspelled ``+key=value``)."""


def check_known_keys(cfg: Any, path: str = "") -> None:
    """Refuse keys that typed nodes of a composed config do not declare.

    Hydra's ``+key=value`` adds a key even to a typed (structured) node, and ``OmegaConf.to_object``
    then drops it silently: a misspelled ``+algorithm.hparams.num_step=1`` would be ignored while
    the run looks configured. Untyped nodes (``model.spec``, ``model.tiny``) accept any key.

    Raises:
        ConfigError: naming the unknown key and listing the valid ones.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    typ = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(typ):
        known = [f.name for f in dataclasses.fields(typ)]
        unknown = [k for k in cfg.keys() if k not in known]
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"unknown key '{where}{unknown[0]}' (a typo in a +key=value override?); valid keys "
                              f"of {path or 'the config'}: {', '.join(sorted(known))}")
    for key in cfg.keys():
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_known_keys(node, f"{path}.{key}" if path else str(key))


def _hparams_node(cls: type) -> Any:
    """A structured node for ``cls`` when OmegaConf can express it, else None.

    Nested blocks that are frozen dataclasses (``TargetHparams`` and ``StatsConfig`` are: they key
    caches) would be read-only nodes, so yaml files and overrides could not set their fields; the
    node is made writable. ``OmegaConf.to_object`` still builds the frozen instances.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    try:
        node = OmegaConf.structured(cls)
    except Exception as exc:  # an unsupported annotation: fall back to checking in code
        log.debug("hparams of %s are not expressible as a structured config: %s", cls, exc)
        return None

    def writable(n: Any) -> None:
        OmegaConf.set_readonly(n, False)
        if n._is_none() or n._is_missing():
            return
        for key in (n.keys() if isinstance(n, DictConfig) else range(len(n))):
            child = n._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                writable(child)

    writable(node)
    return node


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
