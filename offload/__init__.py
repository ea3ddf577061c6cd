"""The runtime: model code per family, checkpoint loading, offloaded execution, generation.

    model = offload.load("path/to/hf-model", device="cpu", dtype="float32")
    new_ids = model.generate([[1, 15043, 29892]], max_new_tokens=64)
"""
from __future__ import annotations

from offload.checkpoint import Checkpoint, CheckpointError
from offload.load import load
from offload.model import Model
from offload.session import Session
from offload.stats import GenerationStats

__all__ = ["load", "Model", "Session", "Checkpoint", "CheckpointError", "GenerationStats"]
