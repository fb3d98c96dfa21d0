"""Steering plug-ins: build per-row vectors and inject them around generation.

A steering method turns a batch of sample indices into the context manager that
``generation.generate_batches`` enters around that batch's ``generate``. ``none`` is the
unsteered baseline.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.generation import BatchContext
from fints_repro.models.loading import LoadedModel
from fints_repro.registry import Registry

SteeringFactory = Callable[[SteeringConfig, LoadedModel, Sequence[Sample]], Optional[BatchContext]]
STEERING: Registry[SteeringFactory] = Registry("steering method")


@STEERING.register("none")
def _no_steering(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample]) -> None:
    return None
