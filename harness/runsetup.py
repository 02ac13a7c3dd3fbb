"""Everything a run needs before its first case, checked in the order that fails fastest.

``setup_run`` validates the config and the algorithm's hyperparameters, builds the probes, reads the
data, refuses to resume a run directory of another configuration, then loads (or reuses) the model
and checks against it what only the model can tell: the algorithm's targets exist, its preparation
(templates, key statistics, projectors, on the base model) runs. Any failure is one ``SetupError``
naming what was being checked, raised before a row or ``run.json`` is written. Only then is
``run.json`` written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from harness.algorithms import EditAlgorithm, get_algorithm
from harness.config import Config, validate
from harness.data.common import DataError
from harness.editor import Editor
from harness.modelcache import MODEL_CACHE, LoadedModel, ModelCache
from harness.models import context_length
from harness.probes import probes_from_config
from harness.results import ResumeError, read_json, write_json
from harness.types import EditRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Overrides that say how a run is executed, not what it computes: no identity column, and a resume
#: may change them.
NOT_IDENTITY = {"threads", "retry_errors"}


class SetupError(RuntimeError):
    """The run cannot start: bad config, data or hyperparameters (found before any row is written)."""


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["algorithm=rome", "+x.y=1"]`` -> ``{"override.algorithm": "rome", "override.x.y": "1"}``."""
    out = {}
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in NOT_IDENTITY or key.startswith("hydra"):
            continue
        out["override." + key] = value
    return out


def seed_step(cfg: Config, step: int) -> None:
    """Seed torch for edit call ``step`` (the same on a resumed run)."""
    torch.manual_seed(cfg.seed * 1_000_003 + step)


@dataclass
class RunSetup:
    """What ``setup_run`` built: the checked config, data, model, algorithm and Editor of one run.

    Attributes:
        max_tokens: the longest text (prompt plus answer) a case may hold (0: no limit known).
        prepare_seconds: time the algorithm's preparation took in this process (0 when reused).
    """

    cfg: Config
    out: Path
    overrides: tuple[str, ...]
    requests: list[EditRequest]
    loaded: LoadedModel
    algorithm: EditAlgorithm
    editor: Editor
    max_tokens: int
    prepare_seconds: float

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tok(self) -> Any:
        return self.loaded.tok

    @property
    def probes(self) -> Any:
        return self.editor.probes

    def save_model(self) -> None:
        """With ``save_model``: the model as it stands (safetensors) + tokenizer, and the accumulated delta."""
        if not self.cfg.save_model:
            return
        d = self.out / "model"
        self.model.save_pretrained(d, safe_serialization=True)
        self.tok.save_pretrained(d)
        names = self.editor.save_delta(self.out / "delta.safetensors")
        log.info("saved the model to %s and the delta (%d tensors) beside it", d, len(names))


def setup_run(cfg: Config, out: Path, overrides: Sequence[str] = (), cache: ModelCache | None = None) -> RunSetup:
    """Check and build everything a run needs; write ``run.json`` last.

    Raises:
        SetupError: anything that makes the run impossible (the message says what and where).
        ResumeError: ``out`` holds a run of another configuration.
    """
    hparams = _checked("config", lambda: validate(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.retry_errors and not cfg.keep_original_weight:
        raise SetupError("retry_errors=true applies to single-edit runs; a sequential run cannot redo a step "
                         "in the middle of its sequence")
    probes = _checked("probes", lambda: probes_from_config(cfg.probes))
    requests = _checked("data", lambda: load_requests(cfg))
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(cfg, out, overrides)
    loaded = (cache or MODEL_CACHE).get(cfg)
    algorithm = get_algorithm(cfg.algorithm.name)(hparams)
    editor = Editor(loaded.model, loaded.tok, algorithm, probes, keep_original_weight=cfg.keep_original_weight,
                    offload_snapshot=cfg.offload_snapshot, verify_untouched=cfg.verify_untouched)

    def against_model() -> tuple[int, float]:
        if requests:
            editor.declared_targets(requests[:cfg.batch_size])
        seconds = editor.prepare()
        if seconds:
            log.info("prepared %s on the base model in %.1fs", cfg.algorithm.name, seconds)
        limit = cfg.max_prompt_tokens or context_length(loaded.model)
        return int(limit or 0), seconds

    max_tokens, seconds = _checked("model", against_model)
    if record is not None:
        write_json(out / "run.json", record)
    return RunSetup(cfg, out, tuple(overrides), requests, loaded, algorithm, editor, max_tokens, seconds)


def _checked(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with any error it raises turned into one ``SetupError`` saying what was being checked."""
    try:
        return fn()
    except SetupError:
        raise
    except DataError as exc:
        raise SetupError(f"data: {exc} (data.skip_invalid=true leaves invalid records out)") from exc
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise SetupError(f"{what}: {msg}") from exc


def load_requests(cfg: Config) -> list[EditRequest]:
    """The run's requests (``cfg.data``); duplicate case ids are refused."""
    from harness.data import load_requests as load

    d = cfg.data
    loaded = load(d.kind, d.path, limit=d.limit, offset=d.offset, skip_invalid=d.skip_invalid)
    if loaded.skipped:
        log.warning("skipped %d invalid record(s) of %s", len(loaded.skipped), d.path or d.kind)
    log.info("%d request(s) from %s", len(loaded.requests), d.path or f"the shipped {d.kind} sample")
    requests = list(loaded.requests)
    if len({r.case_id for r in requests}) != len(requests):
        raise SetupError("the data has duplicate case ids; rows could not be told apart")
    return requests


def run_record(cfg: Config, out: Path, overrides: Sequence[str]) -> dict[str, Any] | None:
    """The ``run.json`` record to write once the run is known to start (None when it exists already).

    Raises:
        ResumeError: ``out`` holds a run of another configuration.
    """
    conf = dataclasses.asdict(cfg)
    conf["data"].pop("limit")  # extending a run with a larger limit is allowed
    for key in NOT_IDENTITY:
        conf.pop(key)
    conf = json.loads(json.dumps(conf, sort_keys=True, default=str))
    old = read_json(out / "run.json")
    if old is not None and old["config"] != conf:
        raise ResumeError(f"{out} holds a run of a different configuration (see its run.json); "
                          "rerun with the same settings or choose a fresh hydra.run.dir")
    return {"config": conf, "overrides": list(overrides)} if old is None else None
