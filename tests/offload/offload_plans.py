"""Helpers for the offloaded-runtime tests: plans with any per-layer layout, and checks that a loaded
model runs exactly its plan (placements, backends, ring, ledger)."""
from __future__ import annotations

import placement
from offload.attention.host import HostAttention
from offload.attention.device import TorchAttention
from offload.attention.streamed import StreamedKVAttention
from placement import LayerPlan, Workload
from placement.build import assemble
from placement.manual import REFERENCE_HARDWARE

GEN_LEN = 12
# one layer of each kind: streamed weights, CPU KV attended on the GPU (through the ring) and on the CPU,
# resident weights and KV; host embedding, streamed head
EVERY_BACKEND = dict(weights="cgcgc", kv="acgca", embedding="cpu", lm_head="cpu", prefetch_depth=2)


def layout_plan(path, *, weights: str, kv: str, embedding: str = "gpu", lm_head: str = "gpu",
                prefetch_depth: int = 2, chunk: int = 5, batch_size: int = 3, max_seq_len: int = 48,
                dtype: str | None = None, quantization: str | None = None):
    """A plan with per-layer placements written as strings, one letter per layer:
    weights 'g' resident / 'c' streamed; kv 'g' on the GPU, 'c' on the CPU attended by the CPU, 'a' on
    the CPU attended by the GPU (streamed through the ring)."""
    spec = placement.load_spec(path, dtype=dtype, quantization=quantization)
    workload = Workload(batch_size=batch_size, prompt_len=max_seq_len - GEN_LEN, gen_len=GEN_LEN)
    assert len(weights) == len(kv) == spec.num_layers, (weights, kv, spec.num_layers)
    kv_bytes = spec.layer_kv_bytes(workload.num_cached_tokens)
    layers = tuple(LayerPlan(index=i, weights="gpu" if w == "g" else "cpu", kv="gpu" if k == "g" else "cpu",
                             attention="cpu" if k == "c" else "gpu", weight_bytes=spec.layer_weight_bytes(i),
                             kv_bytes=kv_bytes)
                   for i, (w, k) in enumerate(zip(weights, kv)))
    return assemble(spec, workload, REFERENCE_HARDWARE, layers=layers, embedding=embedding, lm_head=lm_head,
                    prefetch_depth=prefetch_depth, chunk=chunk)


BACKEND_OF = {("gpu", "gpu"): TorchAttention, ("cpu", "cpu"): HostAttention, ("cpu", "gpu"): StreamedKVAttention}


def assert_runs_plan(model, plan) -> None:
    """The engine uses exactly the plan's placements, and the ledger holds exactly the plan's gpu tier."""
    assert model.plan == plan
    engine, weights = model.engine, model.engine.weights
    assert model.max_seq_len == plan.max_seq_len and model.max_batch_size == plan.max_batch_size
    assert str(model.dtype).replace("torch.", "") == plan.dtype
    assert engine.prefill_chunk_size <= plan.prefill_chunk_size
    for layer, backend in zip(plan.layers, engine.backends):
        assert type(backend) is BACKEND_OF[(layer.kv, layer.attention)], (layer, backend)
        assert weights.placement[layer.index] == layer.weights
        assert weights.is_streamed(layer.index) == (layer.weights == "cpu" or layer.kv == "cpu" and layer.attention == "gpu")
        assert (layer.index in weights.attached) == (layer.kv == "cpu" and layer.attention == "gpu")
    assert weights.placement["embedding"] == plan.embedding.weights and not weights.is_streamed("embedding")
    assert weights.placement["lm_head"] == plan.lm_head.weights
    assert weights.is_streamed("lm_head") == (plan.lm_head.weights == "cpu")
    assert weights.placement["final_norm"] == "gpu"
    num_streamed = len(weights.streamed_items)
    assert num_streamed == sum(l.is_streamed for l in plan.layers) + (plan.lm_head.weights == "cpu")
    if num_streamed:
        assert weights.prefetcher.prefetch_depth == min(plan.prefetch_depth, num_streamed)
        assert weights.ring_bytes == weights.prefetcher.prefetch_depth * plan.slot_bytes
    ledger, gpu = model.ledger, plan.memory.gpu
    assert ledger.max_bytes == gpu.total and ledger.peak_bytes() <= gpu.total
    assert ledger.peak_bytes("weights") == gpu.weights == weights.resident_bytes
    assert ledger.peak_bytes("kv_cache") == gpu.kv_cache
    assert ledger.peak_bytes("buffers") == weights.ring_bytes <= gpu.buffers
    assert ledger.peak_bytes() == weights.resident_bytes + gpu.kv_cache + weights.ring_bytes + \
        ledger.peak_bytes("workspace")


def expected_step_bytes(model, *, batch_size: int, num_tokens: int = 1) -> int:
    """Host->device bytes of one step of `num_tokens` tokens per row: every streamed item once, and on CUDA
    the output [B, Hq, T, D] of each CPU-attended layer sent back to the device (nothing on the CPU)."""
    weights, arch = model.engine.weights, model.arch
    num_bytes = weights.streamed_bytes_per_cycle
    if model.device.type == "cuda":
        num_cpu_attended = sum(type(b) is HostAttention for b in model.engine.backends)
        num_bytes += num_cpu_attended * batch_size * arch.num_heads * num_tokens * arch.head_dim * \
            model.dtype.itemsize
    return num_bytes
