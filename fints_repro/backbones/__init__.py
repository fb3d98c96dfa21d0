"""Backbones: the personalization method that turns samples into prompts (and, for some,
adapts the model). Steering plugs in on top of any of them."""

from fints_repro.backbones.base import BACKBONES, Backbone, build_backbone
from fints_repro.backbones import prompting  # noqa: F401  (registers zero_shot, rag)

__all__ = ["BACKBONES", "Backbone", "build_backbone"]
