"""Decides what goes where: weights and KV cache per layer across GPU memory and CPU RAM.

    import placement
    spec = placement.load_spec("llama-3.1-8b")                    # preset, config.json or checkpoint dir
    hw = placement.Hardware.from_gpu_preset("rtx-4070", cpu_memory="32GiB")
    plan = placement.plan(spec, hw, placement.Workload(batch_size=1, prompt_len=2048, gen_len=512))
    print(plan.summary()); plan.to_json("plan.json")

No torch on this path: torch is imported only by `Hardware.detect()` without a GPU budget and by
`--profile` with CUDA.
"""
from .architecture import DTYPE_BYTES, Architecture, ConfigError, normalize_dtype
from .hardware import GPU_PRESETS, Hardware, HardwareError
from .manual import manual_plan
from .plans import Budget, ItemPlan, LayerPlan, Plan, PlanError, Prediction
from .search import plan
from .sizes import SizeError, format_size, parse_size
from .spec import ModelSpec, load_spec
from .workload import Workload
from .workspace import workspace_bytes

__all__ = ["Architecture", "Budget", "ConfigError", "DTYPE_BYTES", "GPU_PRESETS", "Hardware",
           "HardwareError", "ItemPlan", "LayerPlan", "ModelSpec", "Plan", "PlanError", "Prediction",
           "SizeError", "Workload", "format_size", "load_spec", "manual_plan", "normalize_dtype",
           "parse_size", "plan", "workspace_bytes"]
