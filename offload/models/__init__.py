"""The math of each family, as plain functions over weight dicts (no placement, no caches), found through
the one family registry: each family's description (placement/families) names its math class here as
"offload.models.<module>:<Class>".

Every family object follows `FamilyMath` (offload/models/base.py), so the engine can run the attention
itself between `attention_inputs` and `attention_output`.
"""
from __future__ import annotations

import importlib

from offload.models.base import FamilyMath
from placement.architecture import Architecture


def math_class(arch: Architecture) -> type:
    """The math class the family's description names."""
    module, name = arch.family.math.split(":")
    return getattr(importlib.import_module(module), name)


def build_model(arch: Architecture, device=None) -> FamilyMath:
    """The family's math object for `arch` (Architecture has already rejected unsupported model types)."""
    return math_class(arch)(arch, device)


__all__ = ["FamilyMath", "build_model", "math_class"]
