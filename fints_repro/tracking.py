"""Experiment tracking: wandb (offline by default) or nothing, behind one small interface.

``open_tracker`` is a context manager that always closes the wandb run, marking it failed
when the body raised, or preempted (with ``run.mark_preempting`` and the signal's exit
code) when the run was stopped by SIGTERM or SIGINT (``fints_repro.signals``), so a
crashed or cancelled job in a sweep never leaves a dangling run. The summary's
``run_status`` says which: ``ok``, ``failed`` or ``preempted``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

from fints_repro.config import LoggerConfig
from fints_repro.registry import Registry
from fints_repro.signals import Interrupted

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, Any]) -> None: ...

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None: ...

    def log_curve(self, key: str, values: Sequence[float]) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, rows: Sequence[dict[str, Any]]) -> None:
        pass

    def log_curve(self, key: str, values: Sequence[float]) -> None:
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

    def log_curve(self, key: str, values: Sequence[float]) -> None:
        """One value per step (a training loss) as a line plot, with its table."""
        import wandb

        if not values:
            return
        table = wandb.Table(columns=["step", "value"], data=[[i, float(v)] for i, v in enumerate(values)])
        self.run.log({key: wandb.plot.line(table, "step", "value", title=key)})


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


# A tracker factory: a context manager that yields the tracker and always closes it.
TRACKERS: Registry[Callable[..., ContextManager[Tracker]]] = Registry("tracker")


@contextlib.contextmanager
def open_tracker(cfg: LoggerConfig, *, run_dir: Path, config: dict[str, Any],
                 name: str | None = None) -> Iterator[Tracker]:
    factory = TRACKERS.get(cfg.name, "logger.name")  # unknown: ConfigError listing the known
    if cfg.mode == "disabled":
        factory = TRACKERS.get("none")
    with factory(cfg, run_dir=run_dir, config=config, name=name) as tracker:
        yield tracker


@TRACKERS.register("none")
@contextlib.contextmanager
def _null_tracker(cfg: LoggerConfig, **_: Any) -> Iterator[Tracker]:
    yield NullTracker()


@TRACKERS.register("wandb")
@contextlib.contextmanager
def _wandb_tracker(cfg: LoggerConfig, *, run_dir: Path, config: dict[str, Any],
                   name: str | None = None) -> Iterator[Tracker]:
    import wandb

    run = wandb.init(
        project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group,
        tags=list(cfg.tags), name=name, config=config, dir=str(run_dir), reinit="finish_previous",
    )
    status, exit_code = "failed", 1
    try:
        yield WandbTracker(run)
        status, exit_code = "ok", 0
    except Interrupted as e:  # SIGTERM / SIGINT: a preemption, not a failure
        status, exit_code = "preempted", e.exit_code
        run.mark_preempting()
        raise
    finally:
        run.summary["run_status"] = status
        run.finish(exit_code=exit_code)
        log.info("wandb run %s closed (%s)", run.id, status)
