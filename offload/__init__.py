"""The runtime: model code per family, checkpoint loading, offloaded execution, generation.

    model = offload.load("path/to/hf-model", gpu_memory="8GiB", cpu_memory="48GiB")   # the planner decides
    model = offload.load("path/to/hf-model", plan="plan.json")                        # offload-plan --json
    model = offload.load("path/to/hf-model", gpu_layers=20, kv_gpu_layers=0)          # llama.cpp-style
    model = offload.load("path/to/hf-model", device="cpu", dtype="float32")           # all on one device
    model = offload.load("model.Q4_K_M.gguf") or offload.load("path", quantize="int4")  # 4/8-bit weights
    model = offload.load("Qwen/Qwen3-8B") or offload.load("unsloth/Qwen3-8B-GGUF:Q4_K_M")  # Hub names (cached)
    offload.quantize("path/to/hf-model", "path/to/int4-model", "int4")   # compressed-tensors, loads fast
    print(model.plan.summary()); print(model.memory_report())
    new_ids = model.generate([[1, 15043, 29892]], max_new_tokens=64); print(model.stats.summary())
"""
from __future__ import annotations

from offload.loading.checkpoint import Checkpoint, CheckpointError
from offload.loading.build import load
from offload.loading.quantize import quantize
from offload.loading.memory import MemoryBudgetError
from offload.generation.model import Model
from offload.generation.session import Session
from offload.generation.stats import GenerationStats
from placement import ConfigError, PlanError

__all__ = ["load", "quantize", "Model", "Session", "Checkpoint", "GenerationStats",
           "CheckpointError", "ConfigError", "PlanError", "MemoryBudgetError"]
