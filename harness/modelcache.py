"""The model a worker process keeps between the jobs of a sweep, and the pre-edit measurements made on it.

``MODEL_CACHE`` is the one module-level cache of the harness: the last loaded model, keyed by the
model config, and checked against its load-time fingerprint before each job reuses it (a model that
is not bit-identical to its load is reloaded). The ``PreCache`` it owns holds pre-edit measurements
keyed by weights digest, data identity, case id and probe config, so a sweep over algorithms
measures each case's unedited model once.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.config import Config
from harness.models import load_configured
from harness.probes import Measurement
from harness.snapshot import model_digest
from harness.types import EditRequest

log = logging.getLogger(__name__)


class PreCache:
    """Pre-edit measurements, one request each, keyed by (weights digest, data id, case id, probe id)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str, str, str], tuple[EditRequest, Measurement]] = {}

    def get(self, key: tuple[str, str, str, str], request: EditRequest) -> Measurement | None:
        """The cached measurement, or None (also when the case id now names a different request)."""
        hit = self._items.get(key)
        return hit[1] if hit is not None and hit[0] == request else None

    def put(self, key: tuple[str, str, str, str], request: EditRequest, measurement: Measurement) -> None:
        self._items[key] = (request, measurement)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class LoadedModel:
    """A model as loaded, its load-time weights digest, and the pre-edit measurements made on it."""

    model: torch.nn.Module
    tok: Any
    digest: str
    pre: PreCache = field(default_factory=PreCache)


class ModelCache:
    """Holds the last loaded model of this process (one at a time), for reuse by the next job."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._entry: LoadedModel | None = None

    @staticmethod
    def key(cfg: Config) -> str:
        m = cfg.model
        return json.dumps([m.source, m.cache_dir, m.trust_remote_code, m.spec, m.tiny, m.weights, m.weights_strict,
                           cfg.device, cfg.dtype], sort_keys=True, default=str)

    def get(self, cfg: Config) -> LoadedModel:
        """The model of ``cfg``: reused when cached and still bit-identical to its load, else loaded."""
        key = self.key(cfg)
        if self._entry is not None and self._key == key:
            if model_digest(self._entry.model) == self._entry.digest:
                log.info("reusing the loaded model %s", cfg.model.name or cfg.model.source)
                return self._entry
            log.warning("the cached model no longer matches its load-time fingerprint; reloading")
        self.clear()
        t0 = time.perf_counter()
        model, tok = load_configured(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self._entry, self._key = LoadedModel(model, tok, model_digest(model)), key
        log.info("loaded %s in %.1fs", cfg.model.name or cfg.model.source, time.perf_counter() - t0)
        return self._entry

    @property
    def current(self) -> LoadedModel | None:
        """The model held now, if any."""
        return self._entry

    def clear(self) -> None:
        """Drop the held model."""
        self._entry = self._key = None
        gc.collect()


MODEL_CACHE = ModelCache()
