"""Assemble a Plan from a layout (which layers keep weights / KV on the GPU) and predict its cost.

Shared by the planner (`search.plan`) and the llama.cpp-style builder (`manual.manual_plan`), so both
report the same memory breakdown and the same prediction for the same layout.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from .cost import CostModel, best_decode_step, step_time
from .hardware import Hardware
from .plans import Budget, ItemPlan, LayerPlan, Plan, PlanError, Prediction
from .spec import ModelSpec
from .workload import Workload
from .workspace import MAX_VERIFY_TOKENS, workspace_bytes

MIN_CHUNK_TOKENS = 16
VERIFY_STEP_SLACK = 1.25         # a verification pass "costs about one step" up to this many steps


def chunk_candidates(prompt_len: int) -> list[int]:
    """Prefill chunk sizes the planner tries, largest first: the whole prompt, then powers of two."""
    sizes = [prompt_len]
    size = 1 << (prompt_len.bit_length() - 1)
    while size >= MIN_CHUNK_TOKENS:
        if size < prompt_len:
            sizes.append(size)
        size //= 2
    return sizes


def spread(num_selected: int, num_layers: int) -> list[bool]:
    """`num_selected` of `num_layers` flags set, evenly spaced, the last one set (Bresenham): streamed
    layers spread between resident ones so their copies overlap resident compute. The number set
    among the first `a` layers is exactly a * num_selected // num_layers."""
    return [((i + 1) * num_selected) // num_layers != (i * num_selected) // num_layers
            for i in range(num_layers)]


def layer_plans(spec: ModelSpec, workload: Workload, weights_gpu: list[bool], kv_gpu: list[bool],
                cpu_attention: bool, experts: str = "gpu") -> tuple[LayerPlan, ...]:
    """The layers' plans; `experts` "cpu" or "streamed": every MoE layer's routed experts kept apart in CPU RAM,
    computed there or the routed ones copied to the GPU (see with_gpu_experts to bring some back)."""
    kv_bytes = spec.layer_kv_bytes(workload.num_cached_tokens)
    layers = []
    for i in range(spec.num_layers):
        kv = "gpu" if kv_gpu[i] else "cpu"
        expert_bytes = spec.layer_expert_bytes(i)
        layers.append(LayerPlan(index=i, weights="gpu" if weights_gpu[i] else "cpu", kv=kv,
                                attention="cpu" if kv == "cpu" and cpu_attention else "gpu",
                                weight_bytes=spec.layer_weight_bytes(i), kv_bytes=kv_bytes,
                                expert_bytes=expert_bytes, experts=experts if expert_bytes else "gpu"))
    return tuple(layers)


def with_gpu_experts(layers, room: int) -> tuple[LayerPlan, ...]:
    """The layers with the routed experts of the first resident layers that fit in `room` GPU bytes brought
    back to the GPU from CPU RAM (resident experts never predict slower than CPU-computed or streamed ones)."""
    out = []
    for l in layers:
        if l.experts_apart and l.weights == "gpu" and l.expert_bytes <= room:
            room -= l.expert_bytes
            l = dataclasses.replace(l, experts="gpu")
        out.append(l)
    return tuple(out)


def with_cpu_compute(layers, count: int) -> tuple[LayerPlan, ...]:
    """The layers with `count` of those that may compute on the cpu (LayerPlan.may_compute_on_cpu) marked to run their
    decode steps there (spread evenly among them, so their CPU time interleaves with the others' copies)."""
    eligible = [i for i, l in enumerate(layers) if l.may_compute_on_cpu]
    chosen = {i for i, flag in zip(eligible, spread(count, len(eligible))) if flag} if eligible else set()
    return tuple(dataclasses.replace(l, compute="cpu" if i in chosen else "gpu") for i, l in enumerate(layers))


def cpu_compute_count(cost: CostModel, layers, embedding: str, lm_head: str, prefetch_depth: int,
                      cpu_compute: bool | None) -> int:
    """How many of the layers that may compute on the CPU to compute there in decode (cost.best_decode_step)."""
    eligible = [l for l in layers if l.may_compute_on_cpu]
    if not eligible:
        return 0
    groups = [(n, cost.decode_layer(*k)) for k, n in layer_kinds(l for l in layers if l not in eligible).items()]
    groups += [(1, cost.embedding(embedding, 1)), (1, cost.final_norm()), (1, cost.lm_head(lm_head))]
    w, e, experts = max((l.weight_bytes, l.expert_bytes, l.experts) for l in eligible)
    return best_decode_step(groups, len(eligible), cost.decode_layer("cpu", "cpu", "cpu", w, e, experts),
                            cost.decode_layer_on_cpu(w, e), prefetch_depth, cpu_compute, exhaustive=True,
                            serial=cost.hw.is_cpu_only)[1]


def predict(cost: CostModel, layers, embedding: str, lm_head: str, prefetch_depth: int,
            chunk: int) -> Prediction:
    """The cost model's prediction for explicit per-layer placements."""
    kinds = layer_kinds(layers)
    step = step_time(decode_groups(cost, layers, embedding, lm_head), prefetch_depth, serial=cost.hw.is_cpu_only)
    body = [(n, cost.prefill_layer(*k, chunk)) for k, n in kinds.items()] + [(1, cost.final_norm())]
    prefill_s = cost.prefill_seconds(body, lm_head=cost.lm_head(lm_head),
                                     embedding=cost.embedding(embedding, chunk), prefetch_depth=prefetch_depth,
                                     chunk=chunk)
    return Prediction(prefill_s=prefill_s, decode_tokens_per_s=cost.wl.batch_size / step.seconds,
                      bottleneck=step.bottleneck,
                      verify_tokens=verify_budget(cost, layers, embedding, lm_head, prefetch_depth))


def layer_kinds(layers) -> Counter:
    """How many layers share each placement and size: (weights, kv, attention, weight_bytes, expert_bytes,
    experts) -> count, the arguments of CostModel.decode_layer / prefill_layer."""
    return Counter((l.weights, l.kv, l.attention, l.weight_bytes, l.expert_bytes, l.experts) for l in layers)


def decode_groups(cost: CostModel, layers, embedding: str, lm_head: str) -> list:
    """(count, ItemCost) of a decode step: layers computed on the CPU where they lie (compute "cpu") or on the
    GPU, the embedding of one token a row, the final norm and the LM head."""
    on_cpu = Counter((l.weight_bytes, l.expert_bytes) for l in layers if l.compute == "cpu")
    groups = [(n, cost.decode_layer(*k)) for k, n in layer_kinds(l for l in layers if l.compute != "cpu").items()]
    groups += [(n, cost.decode_layer_on_cpu(*b)) for b, n in on_cpu.items()]
    return groups + [(1, cost.embedding(embedding, 1)), (1, cost.final_norm()), (1, cost.lm_head(lm_head))]


def verify_budget(cost: CostModel, layers, embedding: str, lm_head: str, prefetch_depth: int) -> int:
    """Speculative decoding's token budget: the most tokens (up to MAX_VERIFY_TOKENS) of one row whose
    verification pass costs at most VERIFY_STEP_SLACK times a plain decode step of that row. A pass runs as a
    decode step of its tokens (offload/generation/engine.py verify): the layers a decode step computes on the
    CPU run there on all of them, the others' experts kept apart are taken on the side, and every position gets
    logits."""
    # (a pass of up to MAX_VERIFY_TOKENS tokens runs the fused CPU step, as decode steps of a few rows do)
    one = CostModel(cost.spec, cost.hw, dataclasses.replace(cost.wl, batch_size=1), fused_rows=MAX_VERIFY_TOKENS)
    serial = cost.hw.is_cpu_only
    limit = VERIFY_STEP_SLACK * step_time(decode_groups(one, layers, embedding, lm_head), prefetch_depth,
                                          serial).seconds
    on_cpu = Counter((l.weight_bytes, l.expert_bytes) for l in layers if l.compute == "cpu")
    kinds = layer_kinds(l for l in layers if l.compute != "cpu")
    for tokens in range(MAX_VERIFY_TOKENS, 1, -1):
        rows = CostModel(cost.spec, cost.hw, dataclasses.replace(cost.wl, batch_size=tokens),   # its tokens as rows
                         fused_rows=MAX_VERIFY_TOKENS)
        groups = [(n, one.layer(weights=w, kv=kv, attention=a, weight_bytes=wb, num_rows=tokens,
                                num_keys=one.decode_context, expert_bytes=eb, experts=e))
                  for (w, kv, a, wb, eb, e), n in kinds.items()]
        groups += [(n, rows.decode_layer_on_cpu(*b)) for b, n in on_cpu.items()]
        groups += [(1, one.embedding(embedding, tokens)), (1, one.final_norm()), (1, one.lm_head(lm_head, tokens))]
        if step_time(groups, prefetch_depth, serial).seconds <= limit:
            return tokens
    return 1


def assemble(spec: ModelSpec, workload: Workload, hardware: Hardware, *, layers, embedding: str,
             lm_head: str, prefetch_depth: int, chunk: int, budget: Budget | None = None) -> Plan:
    """The Plan for a layout. `budget` None: the budget recorded is exactly what the plan needs."""
    if spec.arch.tie_word_embeddings and embedding != lm_head:
        raise PlanError("tied embeddings: embedding and lm_head must share one placement")
    emb = ItemPlan(weights=embedding, weight_bytes=spec.embedding_bytes)
    norm = ItemPlan(weights="gpu", weight_bytes=spec.final_norm_bytes)
    head = ItemPlan(weights=lm_head, weight_bytes=spec.lm_head_bytes, read_bytes=spec.lm_head_read_bytes)
    ring = max([l.ring_slot_bytes for l in layers] + [head.read_bytes if lm_head == "cpu" else 0])
    on_demand = [l.index for l in layers if l.experts == "streamed"]   # their routed experts' slots
    expert_slots = spec.expert_slots(workload.batch_size) if on_demand else 0
    expert_slot_bytes = max((spec.routed_expert_bytes(i) for i in on_demand), default=0)
    prefetch_depth = prefetch_depth if ring else 0
    if ring and prefetch_depth < 1:
        raise PlanError("streamed items need a prefetch depth of at least 1")
    workspace = workspace_bytes(spec.arch, workload.batch_size, chunk, workload.max_seq_len, spec.dtype,
                             spec.quantized_shapes)
    reserve = hardware.cuda_reserve_bytes
    prediction = predict(CostModel(spec, hardware, workload), layers, embedding, lm_head, prefetch_depth, chunk)
    fields = dict(model=spec.name, model_type=spec.arch.model_type, num_params=spec.num_params,
                  num_layers=spec.num_layers, dtype=spec.dtype,
                  quantization=spec.quantization,
                  tie_word_embeddings=spec.arch.tie_word_embeddings, workload=workload,
                  layers=layers, embedding=emb, final_norm=norm, lm_head=head, prefetch_depth=prefetch_depth,
                  slot_bytes=ring if prefetch_depth else 0, prefill_chunk_size=chunk,
                  workspace_bytes=workspace, cuda_reserve_bytes=reserve, predicted=prediction,
                  hardware=hardware.name, expert_slots=expert_slots, expert_slot_bytes=expert_slot_bytes)
    if budget is None:   # record what it needs: build once unchecked-sized, then size the budget
        probe = Plan(**fields, budget=Budget(gpu_bytes=1 << 62, cpu_bytes=1 << 62))
        memory = probe.memory
        budget = Budget(gpu_bytes=memory.gpu.total + reserve, cpu_bytes=memory.cpu.total)
    return Plan(**fields, budget=budget)


def need_message(spec: ModelSpec, workload: Workload, hardware: Hardware, min_gpu: int,
                 min_total: int) -> str:
    """One line for PlanError: what the model needs (leanest GPU use; least memory in all) and how
    short the budgets are."""
    from .sizes import format_size as fs
    short = []
    if min_gpu > hardware.gpu_bytes:
        short.append(f"the GPU budget by {fs(min_gpu - hardware.gpu_bytes)}")
    have = hardware.gpu_bytes + hardware.cpu_bytes
    if min_total > have:
        short.append(f"GPU + CPU together by {fs(min_total - have)}")
    if not short:
        short.append(f"the CPU budget ({fs(hardware.cpu_bytes)}) for what the GPU cannot hold")
    kv = spec.layer_kv_bytes(workload.num_cached_tokens) * spec.num_layers
    return (f"{spec.name} does not fit: {fs(spec.total_weight_bytes)} of {spec.dtype} weights + "
            f"{fs(kv)} of KV cache (batch {workload.batch_size} x {workload.max_seq_len} tokens) need "
            f"at least {fs(min_gpu)} of GPU memory (CUDA reserve, workspace, one buffer) and "
            f"{fs(min_total)} of GPU + CPU memory in all; budgets: {fs(hardware.gpu_bytes)} GPU, "
            f"{fs(hardware.cpu_bytes)} CPU; short: " + ", ".join(short))


__all__ = ["chunk_candidates", "spread", "layer_plans", "with_cpu_compute", "with_gpu_experts", "cpu_compute_count",
           "predict", "assemble", "need_message"]
