"""Steering plug-ins: from a user's contrastive pairs to per-row vectors injected during
generation.

A method is one module of ``methods/`` holding a function registered in ``STEERING``
with its typed settings (``@STEERING.register(NAME, settings=...)``: the config node
``steering.<NAME>.*``, whose ``check(key, steering)`` validates it). The function turns
the run's samples into a ``SteeringPlan``: one vector per sample and site (a zero row
leaves that sample unsteered, exactly). The pipeline enters ``plan.batch_context(rows)``
around each generation batch. ``none`` is the unsteered baseline. Adding a method is that
one module and a yaml in ``conf/steering/`` that names it; the registry finds the module
and ``steering_schema()`` adds its settings to the config schema.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that ``fints_repro.steering.hooks`` (the hooks alone) imports
# nothing but torch: the GPU benchmark runs it on a machine with only torch,
# transformers, peft and accelerate.
_FROM_BASE = ("STEERING", "SteeringInputs", "SteeringMethod", "SteeringPlan", "steering_schema")
__all__ = list(_FROM_BASE)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("fints_repro.steering.base"), name)
    if name == "SteeringSchema":
        return importlib.import_module("fints_repro.steering.base").steering_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
