"""The registry of model families: model_type -> the family's torch-free description.

A description (`FamilyDescription`) reads the family's config.json into an `Architecture` and names every
tensor of its checkpoints with its shape: all that placement needs (bytes, FLOPs and KV bytes follow from
the tensor table and the generic fields). It also names the family's math in offload (`math`,
"module:Class"), which offload imports from that string: placement never imports offload.

Adding a family touches its description here, its math module in offload/models, its presets and its
tests; nothing else.
"""
from __future__ import annotations

from placement.config_fields import ConfigError
from placement.families.base import FamilyDescription, Shape
from placement.families.gemma import GEMMA2, GEMMA3, GEMMA3_MULTIMODAL
from placement.families.llama import LLAMA
from placement.families.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from placement.families.opt import OPT
from placement.families.phi3 import PHI3
from placement.families.qwen3 import QWEN3

FAMILIES: dict[str, FamilyDescription] = {model_type: family
                                          for family in (LLAMA, OPT, QWEN3, GEMMA2, GEMMA3, GEMMA3_MULTIMODAL, PHI3,
                                                         MIXTRAL, QWEN2_MOE, QWEN3_MOE)
                                          for model_type in family.model_types}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type) -> FamilyDescription:
    """The description of `model_type`; ConfigError naming the supported ones."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return family


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "FamilyDescription", "Shape", "family_of"]
