"""llama.cpp-style manual plans: "first N layers' weights on the GPU (-ngl), KV of the first M layers
on the GPU (-nkvo is M = 0)", with the same memory breakdown and prediction as the planner."""
from __future__ import annotations

from .build import assemble, chunk_candidates, cpu_compute_count, layer_plans, with_cpu_compute
from .cost import CostModel
from .hardware import (DEFAULT_CPU_ATTENTION_BYTES_PER_S, GENERIC_GPU, GPU_FLOPS_EFFICIENCY, GPU_MEM_EFFICIENCY,
                       Hardware)
from .plans import EXPERT_PLACEMENTS, Budget, Plan, PlanError
from .sizes import format_size
from .spec import ModelSpec
from .workload import Workload
from .workspace import workspace_bytes

# Speeds used for the prediction of a manual plan built without a hardware (budgets unchecked).
REFERENCE_HARDWARE = Hardware(gpu_bytes=0, cpu_bytes=0, pcie_bytes_per_s=GENERIC_GPU.pcie_bytes_per_s,
                              gpu_flops=GENERIC_GPU.flops * GPU_FLOPS_EFFICIENCY,
                              gpu_mem_bytes_per_s=GENERIC_GPU.mem_bytes_per_s * GPU_MEM_EFFICIENCY,
                              cpu_attention_bytes_per_s=DEFAULT_CPU_ATTENTION_BYTES_PER_S,
                              name="reference (generic PCIe 4.0 GPU)")


def manual_plan(spec: ModelSpec, workload: Workload, hardware: Hardware | None = None,
                gpu_layers: int | None = None, kv_gpu_layers: int | None = None,
                cpu_attention: bool = True, prefetch_depth: int = 2, *,
                embedding: str | None = None, lm_head: str | None = None,
                prefill_chunk_size: int | None = None, cpu_compute: bool | None = None,
                experts: str = "gpu") -> Plan:
    """A plan with the weights of the first `gpu_layers` layers and the KV cache of the first
    `kv_gpu_layers` layers on the GPU (None: all). CPU-resident KV is attended on the CPU when
    `cpu_attention`, else copied to the GPU through the ring. Streamed items go through a ring of
    `prefetch_depth` buffers (0 buffers when nothing is streamed).

    `embedding` / `lm_head` default to "gpu" when all layers' weights are on the GPU, else the
    embedding lookup runs on the CPU and the LM head streams, as llama.cpp keeps the output layer off
    the GPU unless everything fits (tied models: both follow the LM head). `prefill_chunk_size`
    defaults to the largest chunk that fits the hardware (the whole prompt without one).

    `cpu_compute`: layers whose weights, KV and attention are on the CPU run their decode steps there
    (True, as llama.cpp does), never (False), or as many as the cost model predicts faster (None).
    `experts` (MoE models): every layer's routed experts with the layer ("gpu") or in RAM, computed by the
    CPU in decode steps ("cpu", llama.cpp's --cpu-moe), or in RAM with the routed ones copied to the GPU each
    decode step ("streamed").

    With a `hardware` its budgets are checked (PlanError when exceeded) and its speeds predict; without
    one, REFERENCE_HARDWARE predicts and the plan's budget records exactly what it needs.
    """
    L = spec.num_layers
    gpu_layers = L if gpu_layers is None else gpu_layers
    kv_gpu_layers = L if kv_gpu_layers is None else kv_gpu_layers
    for name, value in (("gpu_layers", gpu_layers), ("kv_gpu_layers", kv_gpu_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= L:
            raise PlanError(f"{name} must be an int in 0..{L} (None: all), got {value!r}")
    if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise PlanError(f"prefetch_depth must be a positive int, got {prefetch_depth!r}")
    if experts not in EXPERT_PLACEMENTS:
        raise PlanError(f"experts must be one of {', '.join(EXPERT_PLACEMENTS)}, got {experts!r}")
    default_item = "gpu" if gpu_layers == L else "cpu"
    lm_head = lm_head or default_item
    embedding = embedding or (lm_head if spec.arch.tie_word_embeddings else default_item)
    layers = layer_plans(spec, workload, weights_gpu=[i < gpu_layers for i in range(L)],
                         kv_gpu=[i < kv_gpu_layers for i in range(L)], cpu_attention=cpu_attention,
                         experts=experts)
    if prefill_chunk_size is None:
        prefill_chunk_size = _largest_chunk(spec, workload, hardware, layers, embedding, lm_head,
                                              prefetch_depth)
    elif not isinstance(prefill_chunk_size, int) or prefill_chunk_size <= 0:
        raise PlanError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}")
    chunk = min(prefill_chunk_size, workload.prompt_len)
    cost = CostModel(spec, hardware or REFERENCE_HARDWARE, workload)
    depth = prefetch_depth if any(l.ring_slot_bytes for l in layers) or lm_head == "cpu" else 0
    layers = with_cpu_compute(layers, cpu_compute_count(cost, layers, embedding, lm_head, depth, cpu_compute))
    if hardware is None:
        return assemble(spec, workload, REFERENCE_HARDWARE, layers=layers, embedding=embedding,
                        lm_head=lm_head, prefetch_depth=prefetch_depth, chunk=chunk)
    unchecked = assemble(spec, workload, hardware, layers=layers, embedding=embedding, lm_head=lm_head,
                         prefetch_depth=prefetch_depth, chunk=chunk)
    gpu = unchecked.memory.gpu.total + unchecked.cuda_reserve_bytes
    cpu = unchecked.memory.cpu.total
    if gpu > hardware.gpu_bytes or cpu > hardware.cpu_bytes:
        raise PlanError(f"manual plan ({gpu_layers}/{L} layers' weights and {kv_gpu_layers}/{L} layers' "
                        f"KV on the GPU) needs {format_size(gpu)} GPU (with the CUDA reserve) and "
                        f"{format_size(cpu)} CPU; budgets are {format_size(hardware.gpu_bytes)} GPU and "
                        f"{format_size(hardware.cpu_bytes)} CPU")
    return assemble(spec, workload, hardware, layers=layers, embedding=embedding, lm_head=lm_head,
                    prefetch_depth=prefetch_depth, chunk=chunk,
                    budget=Budget(gpu_bytes=hardware.gpu_bytes, cpu_bytes=hardware.cpu_bytes))


def _largest_chunk(spec, workload, hardware, layers, embedding, lm_head, prefetch_depth) -> int:
    if hardware is None:
        return workload.prompt_len
    probe = assemble(spec, workload, hardware, layers=layers, embedding=embedding, lm_head=lm_head,
                     prefetch_depth=prefetch_depth, chunk=workload.prompt_len)
    room = hardware.gpu_bytes - probe.cuda_reserve_bytes - (probe.memory.gpu.total - probe.workspace_bytes)
    for chunk in chunk_candidates(workload.prompt_len):
        if workspace_bytes(spec.arch, workload.batch_size, chunk, workload.max_seq_len, spec.dtype,
                             spec.quantized_shapes) <= room:
            return chunk
    return chunk_candidates(workload.prompt_len)[-1]   # over budget either way: reported by the caller
