"""The one command: ``python -m fints_repro.run +exp=demo`` (see README.md)."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fints_repro.config import RunConfig, register_configs
from fints_repro.errors import FintsError

log = logging.getLogger("fints_repro")

register_configs()


def to_run_config(cfg: DictConfig) -> RunConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


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
    try:
        run_experiment(run_cfg, run_dir, overrides)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:  # one failed job must not stop the sweep
            log.exception("job failed; the multirun goes on (the report lists it as failed)")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "FAILED").write_text(traceback.format_exc())
            return
        if isinstance(e, FintsError):  # a user-facing error: the message, not a traceback
            log.error("%s", e)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
