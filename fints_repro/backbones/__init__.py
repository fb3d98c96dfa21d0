"""Backbones: the personalization method steering plugs into, with a lifecycle (fit →
prompts → model context → N candidates → select; see ``base.py``)."""

from fints_repro.backbones.base import BACKBONES, Backbone, Prompt, build_backbone
from fints_repro.backbones import prompting  # noqa: F401  (registers zero_shot, rag)
from fints_repro.backbones import lora  # noqa: F401,E402  (registers lora)
from fints_repro.backbones import reward_model  # noqa: F401,E402  (registers reward_model)

__all__ = ["BACKBONES", "Backbone", "Prompt", "build_backbone"]
