"""Backbones: the personalization method steering plugs into, with a lifecycle (fit →
prompts → model context → N candidates → select; see ``base.py``). Each backbone is one
module of this package that registers itself in ``BACKBONES``."""

from fints_repro.backbones.base import (BACKBONES, Backbone, FitContext, Prompt, backbone_schema,
                                        build_backbone)

__all__ = ["BACKBONES", "Backbone", "FitContext", "Prompt", "backbone_schema", "build_backbone"]
