"""Experiment tracking: wandb (offline by default) or nothing, behind one small interface.

``open_tracker`` is a context manager that always closes the wandb run, marking it failed
when the body raised, so a crashed job in a sweep never leaves a dangling run.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from fints_repro.config import LoggerConfig
from fints_repro.errors import ConfigError

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, Any]) -> None: ...

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None:
        pass


class WandbTracker:
    def __init__(self, run: Any):
        self.run = run

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log(numeric)
        self.run.summary.update(metrics)

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None:
        import wandb

        if not rows:
            return
        columns = list(rows[0])
        table = wandb.Table(columns=columns,
                            data=[[_cell(r.get(c)) for c in columns] for r in rows])
        self.run.log({key: table})


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


@contextlib.contextmanager
def open_tracker(cfg: LoggerConfig, *, run_dir: Path, config: dict[str, Any],
                 name: str | None = None) -> Iterator[Tracker]:
    if cfg.name == "none" or cfg.mode == "disabled":
        yield NullTracker()
        return
    if cfg.name != "wandb":
        raise ConfigError(f"unknown logger.name={cfg.name!r} (wandb | none)")
    import wandb

    run = wandb.init(
        project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group,
        tags=list(cfg.tags), name=name, config=config, dir=str(run_dir), reinit="finish_previous",
    )
    failed = True
    try:
        yield WandbTracker(run)
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)
        log.info("wandb run %s closed (%s)", run.id, "failed" if failed else "ok")
