"""The one command: ``python -m fints_repro.run +exp=demo`` (see README.md).

Exit codes: 0 done; 2 a user-facing error (a bad config, missing or bad data, a cache or
output that cannot be written: the message says what and where); 1 an unexpected error
(a traceback); 143 / 130 stopped by SIGTERM / SIGINT (``fints_repro/signals.py``: the run
dir gets ``INTERRUPTED``, and the same command resumes the run). In a multirun a failed
job writes ``FAILED`` (its traceback) into its run dir and the sweep goes on; a signal
stops the whole sweep.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fints_repro.cache import write_text_atomic
from fints_repro.compose import register_configs
from fints_repro.config import RunConfig
from fints_repro.errors import FintsError
from fints_repro.report import FAILED, INTERRUPTED
from fints_repro.signals import Interrupted, stop_on_signals

log = logging.getLogger("fints_repro")

register_configs()


def to_run_config(cfg: DictConfig) -> RunConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def _leave_marker(run_dir: Path, name: str, text: str) -> None:
    """Write a marker file into the run dir; a run dir that cannot take it is logged."""
    try:
        write_text_atomic(run_dir / name, text, f"the {name} marker")
    except FintsError as e:
        log.error("%s", e)


@hydra.main(version_base="1.3", config_path="pkg://fints_repro.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from fints_repro.pipeline import run_experiment

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's per-call INFO lines
    run_cfg = to_run_config(cfg)  # every value checked here (RunConfig.__post_init__)
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)  # each method of a preset is composed from these
    run_dir = Path(run_cfg.run_dir or hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN and run_cfg.logger.group is None:
        run_cfg.logger.group = Path(hc.sweep.dir).name  # one wandb group per multirun
    with stop_on_signals():
        try:
            run_experiment(run_cfg, run_dir, overrides)
        except Interrupted as e:
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            _leave_marker(run_dir, INTERRUPTED, f"stopped by {e.name} at {when}; the same "
                                                "command resumes the run\n")
            log.error("stopped by %s; what was finished is kept in %s and the cache: the same "
                      "command resumes the run", e.name, run_dir)
            sys.exit(e.exit_code)
        except Exception as e:
            if hc.mode == RunMode.MULTIRUN:  # one failed job must not stop the sweep
                log.exception("job failed; the multirun goes on (the report lists it as failed)")
                _leave_marker(run_dir, FAILED, traceback.format_exc())
                return
            if isinstance(e, FintsError):  # a user-facing error: the message, not a traceback
                log.error("%s", e)
                sys.exit(2)
            raise


if __name__ == "__main__":
    main()
