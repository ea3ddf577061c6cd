"""The memory report printed at load and by `model.memory_report()`, llama.cpp style: per tier, what
holds memory (weights, KV cache, buffers, workspace), the total, and what is left of the budget.

The "gpu" tier row shows what the runtime has charged to its ledger (equal to the plan's numbers; on
CUDA, torch's own allocated bytes are shown beside it); a draft model loaded with it (all on the device) has
a row of its own; the "cpu" tier row shows the plan's host memory.
"""
from __future__ import annotations

import torch

from placement.sizes import format_size

_COLUMNS = ("weights", "KV cache", "buffers", "workspace", "total", "budget", "free")


def _row(label: str, values: list) -> str:
    cells = [format_size(v) if isinstance(v, int) else str(v) for v in values]
    return f"{label:<18}" + "".join(f"{c:>13}" for c in cells)


def memory_report(model) -> str:
    """A small table of memory per tier for a loaded model (see the module docstring)."""
    plan, ledger = model.plan, model.ledger
    device = model.device
    gpu_label = f"gpu tier ({device})" if device.type == "cuda" else "gpu tier (cpu)"
    lines = [_row("", list(_COLUMNS))]
    if ledger is not None:
        used = [ledger.current_bytes(c) for c in ("weights", "kv_cache", "buffers", "workspace")]
        # the budget the plan was made for, less the CUDA context reserve it sets aside
        budget = plan.budget.gpu_bytes - plan.cuda_reserve_bytes if plan is not None else ledger.max_bytes
        free = budget - sum(used) if budget is not None else "-"
        lines.append(_row(gpu_label, used + [sum(used), "-" if budget is None else budget, free]))
    draft = getattr(model, "draft_model", None)
    if draft is not None and draft.ledger is not None:     # resident on the device, beside (not in) the budget above
        used = [draft.ledger.current_bytes(c) for c in ("weights", "kv_cache", "buffers", "workspace")]
        lines.append(_row("draft model", used + [sum(used), "-", "-"]))
    if plan is not None:
        cpu = plan.memory.cpu
        lines.append(_row("cpu tier (host)", [cpu.weights, cpu.kv_cache, 0, 0, cpu.total, plan.budget.cpu_bytes,
                                              plan.budget.cpu_bytes - cpu.total]))
    if device.type == "cuda":
        lines.append(f"torch on {device}: allocated {format_size(torch.cuda.memory_allocated(device))} "
                     f"(peak {format_size(torch.cuda.max_memory_allocated(device))}), reserved "
                     f"{format_size(torch.cuda.memory_reserved(device))} "
                     f"(peak {format_size(torch.cuda.max_memory_reserved(device))})")
    return "\n".join(lines)
