"""The planner: the placement with the least predicted time for the workload within both budgets.

Decoder layers are identical, so the search runs over counts, not subsets: for every prefill chunk
size, embedding / LM head placement, attention site for CPU-resident KV ("cpu" or "gpu"), number of
layers whose KV stays on the GPU (the first ones) and prefetch depth, it keeps as many layers' weights
resident as the GPU budget allows (resident weights never predict slower) and spreads the streamed
layers evenly between them. The objective is the whole workload: prefill time + gen_len decode steps.

A mixture-of-experts model is searched three times: routed experts with their layers ("gpu": resident or
streamed with them), routed experts kept in CPU RAM and computed there ("cpu"), or kept there with the routed
ones copied to the GPU each decode step ("streamed"), the rest of each layer placed as above; unless the
caller asked for one layout, the last two are also tried with the experts of the first resident layers
brought back to the GPU while they fit.
"""
from __future__ import annotations

from .build import (assemble, chunk_candidates, cpu_compute_count, layer_plans, need_message, spread,
                    with_cpu_compute, with_gpu_experts)
from .cost import MAX_PREFETCH_DEPTH, CostModel, best_decode_step
from .hardware import Hardware
from .plans import Budget, Plan, PlanError
from .spec import ModelSpec
from .workload import Workload
from .workspace import workspace_bytes

_KINDS = (("gpu", "gpu"), ("cpu", "gpu"), ("gpu", "cpu"), ("cpu", "cpu"))   # (weights, kv)
ALL_CPU = ("cpu", "cpu", "cpu")      # weights, kv, attention: the layers that may decode on the CPU


EXPERTS = ("gpu", "cpu", "streamed")


def plan(spec: ModelSpec, hardware: Hardware, workload: Workload, cpu_compute: bool | None = None,
         experts: str | None = None) -> Plan:
    """The best plan by predicted time for `workload`; PlanError saying what is needed and how short
    the budgets are when nothing fits. `cpu_compute`: layers with weights, KV and attention on the cpu
    run their decode steps there (True), never (False), or where predicted faster (None; build.with_cpu_compute).
    `experts` (MoE models): every layer's routed experts with the layer ("gpu"), on the CPU ("cpu", as
    llama.cpp's --cpu-moe), in CPU RAM with the routed ones copied to the GPU each decode step ("streamed"),
    or the fastest of those and of the last two with the experts of the first resident layers brought back
    to the GPU while they fit (None)."""
    if experts is not None and experts not in EXPERTS:
        raise PlanError(f"experts must be one of {', '.join(EXPERTS)} (or None: the planner decides), got {experts!r}")
    modes = ("gpu",) if not spec.arch.moe_layers else (experts,) if experts else EXPERTS
    layouts = {mode: _best_layout(spec, hardware, workload, cpu_compute, mode) for mode in modes}   # one search each
    plans = [_settle(spec, hardware, workload, cpu_compute, mode, found, backfill) for mode, found in layouts.items()
             if found is not None for backfill in ((False, True) if mode != "gpu" and experts is None else (False,))]
    if not plans:
        raise PlanError(_no_fit(spec, hardware, workload, chunk_candidates(workload.prompt_len)[-1],
                                "cpu" in modes))   # (the leanest GPU use: experts on the cpu)
    gen = workload.gen_len * workload.batch_size
    return min(plans, key=lambda p: p.predicted.prefill_s + gen / p.predicted.decode_tokens_per_s)


def _settle(spec: ModelSpec, hardware: Hardware, workload: Workload, cpu_compute: bool | None, mode: str,
            found, backfill: bool) -> Plan:
    """The Plan of the layout `_best_layout` found for experts placed as `mode` says (`backfill`: then the
    experts of the first resident layers back on the GPU while they fit)."""
    _, layout, cost = found
    chunk, emb_p, lm_p, cpu_attention, n_kv, n_w, prefetch_depth, _ = layout
    L = spec.num_layers
    layers = layer_plans(spec, workload, weights_gpu=[not s for s in spread(L - n_w, L)],
                         kv_gpu=[i < n_kv for i in range(L)], cpu_attention=cpu_attention == "cpu", experts=mode)
    # the search ranked layouts by a few candidate counts; the one it settles on gets the best count of all
    on_cpu_count = cpu_compute_count(cost, layers, emb_p, lm_p, prefetch_depth, cpu_compute)
    layers = with_cpu_compute(layers, on_cpu_count)
    settled = dict(embedding=emb_p, lm_head=lm_p, prefetch_depth=max(prefetch_depth, 1), chunk=chunk)
    if backfill:
        probe = assemble(spec, workload, hardware, layers=layers, **settled)
        layers = with_gpu_experts(layers, hardware.gpu_bytes - probe.cuda_reserve_bytes - probe.memory.gpu.total)
    return assemble(spec, workload, hardware, layers=layers, **settled,
                    budget=Budget(gpu_bytes=hardware.gpu_bytes, cpu_bytes=hardware.cpu_bytes))


def _best_layout(spec: ModelSpec, hardware: Hardware, workload: Workload, cpu_compute: bool | None,
                 experts: str):
    """(rank, layout, cost model) of the fastest layout with every MoE layer's experts placed as `experts`
    says, or None when none fits."""
    L = spec.num_layers
    w = max(spec.layer_weight_bytes(i) for i in range(L))
    e = max(spec.layer_expert_bytes(i) for i in range(L))     # (layers are alike: the largest stands for all)
    apart = e if experts != "gpu" else 0                       # experts kept apart in CPU RAM
    held = w - apart                                           # what a layer's `weights` place
    experts_cpu = L * apart                                    # RAM for the experts kept there
    # GPU slots for the routed experts a decode step copies
    staging = spec.expert_slots(workload.batch_size) * max(spec.routed_expert_bytes(i) for i in range(L)) \
        if experts == "streamed" else 0
    kv = spec.layer_kv_bytes(workload.num_cached_tokens)
    tied = spec.arch.tie_word_embeddings
    emb_b, lm_b, lm_read, norm_b = (spec.embedding_bytes, spec.lm_head_bytes, spec.lm_head_read_bytes,
                                    spec.final_norm_bytes)
    reserve = hardware.cuda_reserve_bytes
    cost = CostModel(spec, hardware, workload)
    decode = {(wp, kp, a): cost.decode_layer(wp, kp, a, w, e, experts) for wp, kp in _KINDS for a in ("gpu", "cpu")
              if not (a == "cpu" and kp == "gpu")}
    on_cpu = cost.decode_layer_on_cpu(w, e)          # an all-cpu layer computed where it lies
    norm = cost.final_norm()
    heads = {p: cost.lm_head(p) for p in ("gpu", "cpu")}
    item_choices = [("gpu", "gpu"), ("cpu", "cpu")] if tied else \
        [("gpu", "gpu"), ("cpu", "gpu"), ("gpu", "cpu"), ("cpu", "cpu")]
    gen = workload.gen_len
    best: list = [None, None]                  # rank, layout
    decode_memo: dict = {}
    chunks = chunk_candidates(workload.prompt_len)

    def consider(chunk, emb_p, lm_p, mode, n_w, n_kv, d) -> int:
        """Rank one layout (keeping the best); returns how many of its layers decode on the CPU."""
        fixed_cpu = (emb_b if emb_p == "cpu" else 0) + (lm_b if lm_p == "cpu" else 0)
        if (L - n_w) * held + experts_cpu + (L - n_kv) * kv + fixed_cpu > hardware.cpu_bytes:
            return 0
        counts = _counts(L, n_w, n_kv)
        key = (n_w, n_kv, mode, emb_p, lm_p, d)
        memo = decode_memo.get(key)
        if memo is None:
            may_cpu = mode == "cpu" and experts != "streamed"     # its all-cpu layers may decode on the CPU
            groups = [(c, decode[(wp, kp, "gpu" if kp == "gpu" else mode)])
                      for (wp, kp), c in zip(_KINDS, counts) if not (may_cpu and (wp, kp, mode) == ALL_CPU)]
            groups += [(1, cost.embedding(emb_p, 1)), (1, norm), (1, heads[lm_p])]
            eligible = counts[3] if may_cpu else 0
            timed, on_cpu_count = best_decode_step(groups, eligible, decode[ALL_CPU], on_cpu, d, cpu_compute,
                                                   serial=hardware.is_cpu_only)
            memo = decode_memo[key] = (timed.seconds, on_cpu_count)
        step, on_cpu_count = memo
        body = [(c, prefill[(wp, kp, "gpu" if kp == "gpu" else mode)])
                for (wp, kp), c in zip(_KINDS, counts)] + [(1, norm)]
        total = cost.prefill_seconds(body, lm_head=heads[lm_p], embedding=prefill_emb[emb_p],
                                     prefetch_depth=d, chunk=chunk) + gen * step
        rank = (total, d, -n_w, -n_kv, mode == "gpu", emb_p == "cpu", -chunk)
        if best[0] is None or rank < best[0]:
            best[:] = [rank, (chunk, emb_p, lm_p, mode, n_kv, n_w, d, on_cpu_count)]
        return on_cpu_count

    for chunk in chunks:
        ws = workspace_bytes(spec.arch, workload.batch_size, chunk, workload.max_seq_len, spec.dtype,
                             spec.quantized_shapes)
        gpu_avail = hardware.gpu_bytes - reserve - ws - norm_b - staging
        if gpu_avail < 0:
            continue
        prefill = {k: cost.prefill_layer(*k, w, e, experts, chunk) for k in decode}
        prefill_emb = {p: cost.embedding(p, chunk) for p in ("gpu", "cpu")}
        for emb_p, lm_p in item_choices:
            fixed_gpu = (emb_b if emb_p == "gpu" else 0) + (lm_b if lm_p == "gpu" else 0)
            lm_ring = lm_read if lm_p == "cpu" else 0
            for mode in ("cpu", "gpu"):
                for prefetch_depth in range(1, MAX_PREFETCH_DEPTH + 1):
                    for n_w, n_kv, d in _layouts(L, held, kv, gpu_avail - fixed_gpu, lm_ring, mode, prefetch_depth,
                                                 apart):
                        candidates = [n_kv]
                        if mode == "cpu" and experts != "streamed" and cpu_compute is not False and n_w < L and n_kv > 0:
                            # layers decode on the CPU only with their KV there: all KV on the CPU gives the
                            # most of them (k); then the most GPU KV that still leaves k
                            k = consider(chunk, emb_p, lm_p, mode, n_w, 0, d)
                            if k:
                                candidates += [next((n for n in range(n_kv - 1, 0, -1)
                                                     if _counts(L, n_w, n)[3] >= k), 0)]
                        for n in candidates:
                            consider(chunk, emb_p, lm_p, mode, n_w, n, d)
    return None if best[1] is None else (best[0], best[1], cost)


def _layouts(L: int, w: int, kv: int, room: int, lm_ring: int, mode: str, prefetch_depth: int,
             expert_ring: int = 0):
    """(n_w, n_kv, prefetch_depth used) candidates, most resident weights first: for each number n_w of layers
    with resident weights, the most layers' KV on the GPU that fit in `room` bytes (more GPU KV never
    predicts slower at equal n_w, unless layers decode on the CPU, which needs their KV there: `plan` then
    tries less GPU KV too), stopping once all KV fits. `expert_ring`: the slot CPU experts stream through in
    prefill (a streamed layer then holds two slots at once: depth 2 at least).
    With all KV on the GPU the attention site is moot: only mode "cpu" yields that layout."""
    for n_w in range(L, -1, -1):
        if expert_ring and n_w < L and prefetch_depth < 2:
            continue
        layer_ring = max(w if n_w < L else 0, expert_ring)
        streams = n_w < L or lm_ring > 0 or expert_ring > 0
        left = room - n_w * w - (prefetch_depth * max(layer_ring, lm_ring) if streams else 0)
        if left >= L * kv:
            if mode == "cpu":
                yield n_w, L, prefetch_depth if streams else 0
            return
        kv_ring = kv if mode == "gpu" else 0
        streams = streams or kv_ring > 0
        left = room - n_w * w - (prefetch_depth * max(layer_ring + kv_ring, lm_ring) if streams else 0)
        n_kv = min(L - 1, left // kv)
        if n_kv >= 0:
            yield n_w, n_kv, prefetch_depth if streams else 0


def _counts(L: int, n_w: int, n_kv: int) -> tuple[int, int, int, int]:
    """Layers per kind in _KINDS order for n_w resident weights (streamed ones spread) and the first
    n_kv layers' KV on the GPU (see build.spread for the exact count in a prefix)."""
    streamed = L - n_w
    front = n_kv * streamed // L
    return n_kv - front, front, (L - n_kv) - (streamed - front), streamed - front


def _no_fit(spec: ModelSpec, hardware: Hardware, workload: Workload, min_chunk: int, cpu_experts: bool) -> str:
    L = spec.num_layers
    w = max(spec.layer_weight_bytes(i) - (spec.layer_expert_bytes(i) if cpu_experts else 0) for i in range(L))
    ws = workspace_bytes(spec.arch, workload.batch_size, min_chunk, workload.max_seq_len, spec.dtype,
                             spec.quantized_shapes)
    base = hardware.cuda_reserve_bytes + ws + spec.final_norm_bytes
    min_gpu = base + max(w, spec.lm_head_read_bytes)
    min_total = base + spec.total_weight_bytes - spec.final_norm_bytes + \
        L * spec.layer_kv_bytes(workload.num_cached_tokens)
    return need_message(spec, workload, hardware, min_gpu, min_total)
