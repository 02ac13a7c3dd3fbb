"""The command line: ``python -m harness`` (console script ``harness``), a Hydra application.

This is the only module that imports Hydra. It composes ``conf/config.yaml`` (typed by the schemas
of ``harness.config``), turns it into a ``Config`` and hands it to ``harness.runner.run`` with the
job's output directory and task overrides. Sweeps (``-m``) run through Hydra's launcher plugins:
the basic one (jobs one after another in this process), ``hydra/launcher=joblib``/``local`` (local
worker processes), ``submitit_local`` and ``submitit_slurm``/``slurm``.

    python -m harness                                    # SmolLM2, CounterFact sample, 5 cases, ROME
    python -m harness model=tiny algorithm=direct data.limit=20 hydra.run.dir=runs/try
    python -m harness -m algorithm=none,direct data.limit=50 hydra/launcher=local
    python -m harness.collect runs/multirun/<date>/<time>
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import NoReturn
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import CONF_DIR, Config, ConfigError, check_known_keys, register_configs
from harness.results import summary_table

log = logging.getLogger("harness")

register_configs()  # before Hydra composes anything (also in joblib/submitit worker processes)

def to_config(cfg: DictConfig) -> Config:
    """The typed ``Config`` of a composed config.

    Raises:
        ConfigError: a key that a typed group does not declare (``+key=value`` typos).
        omegaconf errors / ValueError: missing mandatory values (``???``), invalid values.
    """
    check_known_keys(cfg)
    return OmegaConf.to_object(cfg)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` outside a Hydra run (no run directory)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="harness"):
        return compose("config", overrides=list(overrides))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> None:
    from harness.results import ResumeError
    from harness.runlock import RunLockedError
    from harness.runner import SetupError, run

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    try:
        conf = to_config(cfg)
    except (ConfigError, ValueError, OmegaConfBaseException) as exc:
        fail(f"config: {exc}")
    try:
        result = run(conf, out, list(hc.overrides.task))
    except (SetupError, ResumeError, RunLockedError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        cases = out / "cases.csv"
        where = (f"every finished case is in {cases}" if cases.exists() else "no case had finished")
        print(f"\ninterrupted: the model was restored and {where}.\n"
              f"Resume with the same command plus hydra.run.dir={out}", file=sys.stderr)
        sys.exit(130)
    print(f"\n{conf.algorithm.name} on {conf.model.name or conf.model.source}: {result.n_cases} case(s), "
          f"{result.n_errors} error(s)")
    print(summary_table(result.summary))
    print(f"tables: {out / 'cases.csv'}  {out / 'summary.csv'}" +
          (f"  {out / 'retention.csv'}" if (out / "retention.csv").exists() else ""))
    if result.n_cases and result.n_errors == result.n_cases:
        fail(f"every case failed ({result.n_errors} error row(s) in {out / 'cases.csv'}; see its error column)",
             code=1)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr (no traceback) and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console-script entry point (``harness``, ``python -m harness``)."""
    _app()


if __name__ == "__main__":
    main()
