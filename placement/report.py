"""Plan.summary(): the human-readable report the CLI prints."""
from __future__ import annotations

from .sizes import format_size


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _layer_rows(plan, with_experts: bool) -> list[tuple[str, ...]]:
    """One row per run of consecutive identical layers: range, weights, kv, attention, decode compute, where
    the routed experts are (MoE models), sizes."""
    rows, start = [], 0
    layers = plan.layers
    for i in range(1, len(layers) + 1):
        if i < len(layers) and _same(layers[i], layers[start]):
            continue
        first, last = layers[start], layers[i - 1]
        span = f"{first.index}" if first is last else f"{first.index}-{last.index}"
        experts = (first.experts if first.expert_bytes else "-",) if with_experts else ()
        rows.append((span, str(i - start), first.weights, first.kv, first.attention, first.compute, *experts,
                     format_size(first.weight_bytes), format_size(first.kv_bytes)))
        start = i
    return rows


def _same(a, b) -> bool:
    return (a.weights, a.kv, a.attention, a.compute, a.weight_bytes, a.kv_bytes, a.expert_bytes, a.experts) == \
        (b.weights, b.kv, b.attention, b.compute, b.weight_bytes, b.kv_bytes, b.expert_bytes, b.experts)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    out = []
    for r in [header] + rows:
        cells = [r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]) for c in range(len(r))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def format_plan(plan) -> str:
    wl, mem, pred = plan.workload, plan.memory, plan.predicted
    lines = [f"model     {plan.model} ({plan.model_type}, {_params(plan.num_params)} parameters, "
             f"{plan.num_layers} layers, {plan.dtype}"
             f"{'' if plan.quantization is None else ', layers quantized ' + plan.quantization})"]
    if plan.hardware:
        lines.append(f"hardware  {plan.hardware}")
    lines.append(f"budget    GPU {format_size(plan.budget.gpu_bytes)}, CPU {format_size(plan.budget.cpu_bytes)}")
    lines.append(f"workload  batch {wl.batch_size}, prompt {wl.prompt_len} + generate {wl.gen_len} tokens "
                 f"(prefill in chunks of {plan.prefill_chunk_size})")
    lines.append("")
    # a MoE model: where each layer's routed experts live and run ("cpu": computed there; "streamed": the
    # routed ones copied to the GPU; their bytes are counted in weights/layer and, in the memory table, on the CPU)
    moe = any(l.expert_bytes for l in plan.layers)
    header = ("layers", "count", "weights", "kv", "attention", "decode on", *(("experts",) if moe else ()),
              "weights/layer", "kv/layer")
    lines += _table(header, _layer_rows(plan, moe), right={1, len(header) - 2, len(header) - 1})
    items = [("embedding", plan.embedding), ("final_norm", plan.final_norm), ("lm_head", plan.lm_head)]
    item_rows = []
    for name, item in items:
        note = ""
        if name == "lm_head" and plan.tie_word_embeddings:
            note = "tied to the embedding table"
        elif name == "lm_head" and item.weights == "cpu":
            note = "streamed through the buffer ring"
        elif name == "embedding" and item.weights == "cpu":
            note = "lookup on the CPU, rows sent to the GPU"
        item_rows.append((name, item.weights, format_size(item.weight_bytes), note))
    lines.append("")
    lines += _table(("item", "weights", "bytes", ""), item_rows, right={2})
    ring = (f"{plan.prefetch_depth} x {format_size(plan.slot_bytes)}" if plan.prefetch_depth else "none")
    if plan.expert_slots:
        ring += f" + experts {plan.expert_slots} x {format_size(plan.expert_slot_bytes)}"
    gpu_total = mem.gpu.total + plan.cuda_reserve_bytes
    rows = [("weights", format_size(mem.gpu.weights), format_size(mem.cpu.weights)),
            ("kv cache", format_size(mem.gpu.kv_cache), format_size(mem.cpu.kv_cache)),
            (f"buffers ({ring})", format_size(mem.gpu.buffers), "-"),
            ("workspace", format_size(mem.gpu.workspace), "-"),
            ("cuda reserve", format_size(plan.cuda_reserve_bytes), "-"),
            ("total", format_size(gpu_total), format_size(mem.cpu.total)),
            ("budget", format_size(plan.budget.gpu_bytes), format_size(plan.budget.cpu_bytes))]
    lines.append("")
    lines += _table(("memory", "GPU", "CPU"), rows, right={1, 2})
    lines.append("")
    per_seq = pred.decode_tokens_per_s / wl.batch_size
    batch_note = f" ({per_seq:.2f} per sequence)" if wl.batch_size > 1 else ""
    lines.append(f"predicted prefill {pred.prefill_s:.2f} s, decode {pred.decode_tokens_per_s:.2f} "
                 f"tokens/s{batch_note}, bottleneck: {pred.bottleneck}; speculative decoding's budget: "
                 f"{pred.verify_tokens} tokens a verification pass for about a step's cost")
    return "\n".join(lines)
