"""Backbones: the personalization method steering plugs into, with a lifecycle (fit →
prompts → model context → N candidates → select; see ``base.py``)."""

from fints_repro.backbones.base import BACKBONES, Backbone, Prompt, build_backbone
from fints_repro.backbones import prompting  # noqa: F401  (registers zero_shot, rag)

__all__ = ["BACKBONES", "Backbone", "Prompt", "build_backbone"]
