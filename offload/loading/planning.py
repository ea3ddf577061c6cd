"""Which plan `offload.load` runs: the one given, a manual one (llama.cpp-style overrides, or the plain
"everything on the device" path), or the planner's for the memory budgets.

Workload for planning: `max_batch_size` rows of `max_seq_len` tokens, split as gen_len = max_seq_len // 4
(at least 1) and prompt_len = the rest. The split only weighs the prediction (prefill vs decode) and
bounds the prefill chunk (<= prompt_len); the memory the plan reserves depends on max_seq_len alone, so
any prompt/generation split that fits max_seq_len runs within the plan.
"""
from __future__ import annotations

import logging
from pathlib import Path

import placement
from placement import Hardware, Plan, PlanError, Workload
from placement.architecture import Architecture
from placement.plans import EXPERT_PLACEMENTS

log = logging.getLogger(__name__)
GEN_FRACTION = 4       # gen_len = max_seq_len // GEN_FRACTION


def planning_workload(max_batch_size: int, max_seq_len: int) -> Workload:
    """The Workload whose KV cache is max_batch_size x max_seq_len (split documented above)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a generated one), got {max_seq_len}")
    gen_len = max(1, max_seq_len // GEN_FRACTION)
    return Workload(batch_size=max_batch_size, prompt_len=max_seq_len - gen_len, gen_len=gen_len)


def planning_hardware(device, gpu_memory, cpu_memory) -> Hardware:
    """The hardware to plan for: this machine's GPU `device` (its own index: budgets of cuda:1 are read on
    cuda:1), or on device "cpu" the CPU standing in for it (no CUDA reserve is taken off a CPU budget, and
    the prediction uses CPU speeds)."""
    if device.type == "cuda":
        return Hardware.detect(gpu_memory, cpu_memory, device_index=device.index)
    return Hardware.cpu_only(gpu_memory, cpu_memory)


def read_plan(plan) -> Plan:
    """A Plan, or the path of a JSON file written by `offload-plan --json` / Plan.to_json."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, Path)):
        return Plan.from_json(Path(plan))
    raise ValueError(f"plan must be a placement.Plan or the path of a plan JSON file, got {type(plan).__name__}")


def check_plan_matches(plan: Plan, arch: Architecture, path) -> None:
    """PlanError unless the plan was made for this checkpoint's model."""
    mine = {"model_type": arch.model_type, "num_layers": arch.num_layers, "num_params": arch.num_params,
            "tie_word_embeddings": arch.tie_word_embeddings}
    theirs = {key: getattr(plan, key) for key in mine}
    wrong = [f"{key} {theirs[key]} (checkpoint: {mine[key]})" for key in mine if mine[key] != theirs[key]]
    if wrong:
        raise PlanError(f"plan for {plan.model!r} does not match the checkpoint {path}: " + ", ".join(wrong))
    if plan.final_norm.weights != "gpu":
        raise PlanError("plan puts final_norm on the cpu; the runtime keeps it on the gpu tier "
                        "(as the planner always does)")


def choose_plan(*, path, arch: Architecture, device, dtype: str, max_batch_size: int,
                quantization: str | None, max_seq_len: int | None, default_max_seq_len: int, plan=None, gpu_memory=None,
                cpu_memory=None, gpu_layers=None, kv_gpu_layers=None, cpu_attention=None,
                prefill_chunk_size: int | None = None, dtype_given: bool = False,
                max_batch_size_given: bool = False, cpu_compute: bool | None = None,
                experts: str | None = None) -> Plan:
    """The plan to run (see the module docstring); every error is a ValueError raised before anything
    is allocated (PlanError when nothing fits the budgets)."""
    overrides = {k: v for k, v in (("gpu_layers", gpu_layers), ("kv_gpu_layers", kv_gpu_layers),
                                   ("cpu_attention", cpu_attention)) if v is not None}
    if cpu_compute is not None and not isinstance(cpu_compute, bool):
        raise ValueError(f"cpu_compute must be True, False or None, got {cpu_compute!r}")
    if experts is not None and experts not in EXPERT_PLACEMENTS:
        raise ValueError(f"experts must be one of {', '.join(map(repr, EXPERT_PLACEMENTS))} or None (the planner "
                         f"decides), got {experts!r}")
    if experts is not None and not arch.moe_layers:
        raise ValueError(f"experts={experts!r} places routed experts; {arch.model_type} has none (a dense model)")
    if plan is not None:
        conflicting = [name for name, value in (("gpu_memory", gpu_memory), ("cpu_memory", cpu_memory),
                                                 ("cpu_compute", cpu_compute), ("experts", experts),
                                                 *overrides.items()) if value is not None]
        if conflicting:
            raise ValueError(f"plan= runs exactly the given plan; drop {', '.join(conflicting)} "
                             "(or drop plan= to plan from them)")
        chosen = read_plan(plan)
        check_plan_matches(chosen, arch, path)
        for name, given, planned in (("dtype", dtype if dtype_given else None, chosen.dtype),
                                     ("max_seq_len", max_seq_len, chosen.max_seq_len),
                                     ("max_batch_size", max_batch_size if max_batch_size_given else None,
                                      chosen.max_batch_size),
                                     ("prefill_chunk_size", prefill_chunk_size, chosen.prefill_chunk_size),
                                     ("quantize", quantization, chosen.quantization)):
            if given is not None and given != planned:
                raise ValueError(f"{name}={given!r} disagrees with the plan's {planned!r}; the plan is run "
                                 "exactly (make a new plan, or leave the argument out)")
        return chosen
    workload = planning_workload(max_batch_size, default_max_seq_len if max_seq_len is None else max_seq_len)
    spec = placement.load_spec(path, dtype=dtype, quantization=quantization)
    has_budget = gpu_memory is not None or cpu_memory is not None
    if overrides or (not has_budget and device.type != "cuda"):
        # manual plan; nothing at all given on the CPU = the plain path: everything on the device
        hardware = planning_hardware(device, gpu_memory, cpu_memory) if has_budget or device.type == "cuda" \
            else None
        return placement.manual_plan(spec, workload, hardware, gpu_layers=gpu_layers,
                                     kv_gpu_layers=kv_gpu_layers,
                                     cpu_attention=True if cpu_attention is None else bool(cpu_attention),
                                     prefill_chunk_size=prefill_chunk_size, cpu_compute=cpu_compute,
                                     experts=experts or "gpu")
    chosen = placement.plan(spec, planning_hardware(device, gpu_memory, cpu_memory), workload,
                            cpu_compute=cpu_compute, experts=experts)
    if prefill_chunk_size is not None and prefill_chunk_size > chosen.prefill_chunk_size:
        raise ValueError(f"prefill_chunk_size={prefill_chunk_size} exceeds the {chosen.prefill_chunk_size} "
                         "tokens the plan's workspace allows; leave it out or make it smaller")
    return chosen
