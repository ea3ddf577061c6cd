"""The offloaded runtime on CUDA: pinned host memory for streamed weights and CPU KV, the copy stream busy
while compute runs (profiler timeline), parity with the resident path, and measured peak memory within
the plan's GPU total across several budgets."""
from __future__ import annotations

import pytest
import torch

import offload
import placement
from offload.host_attention import HostAttention
from offload.streamed_kv import StreamedKVAttention
from tests.offload.builders import build_checkpoint
from tests.offload.offload_plans import assert_runs_plan, layout_plan
from tests.offload.test_offload_parity import DEEP_LAYERS, LONG, NUM_NEW, PROMPTS

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def llama5(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama5_cuda")
    build_checkpoint(path, "llama", num_hidden_layers=DEEP_LAYERS)
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Big enough layers (~17 MB each in float32) that a copy takes a while next to a prefill chunk."""
    path = tmp_path_factory.mktemp("llama_wide_cuda")
    build_checkpoint(path, "llama", num_hidden_layers=6, hidden_size=512, intermediate_size=2048,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return path


def test_offloaded_cuda_matches_resident_and_uses_pinned_memory(llama5):
    plan = layout_plan(llama5, weights="cgcgc", kv="acgca", embedding="cpu", lm_head="cpu")
    model = offload.load(llama5, plan=plan, device="cuda", progress=False)
    assert_runs_plan(model, plan)
    weights = model.engine.weights
    assert all(packed.is_pinned for packed in weights.prefetcher.items)       # streamed weights + KV
    for backend in model.engine.backends:
        if isinstance(backend, HostAttention):
            assert backend.k_cache.is_pinned() and backend.v_cache.is_pinned()
        if isinstance(backend, StreamedKVAttention):
            assert backend.host_k.is_pinned() and backend.host_v.is_pinned()
    resident = offload.load(llama5, device="cuda", dtype="float32", max_batch_size=3, max_seq_len=48,
                            prefill_chunk_size=5, progress=False)
    torch.testing.assert_close(model.forward([LONG, PROMPTS[2]]), resident.forward([LONG, PROMPTS[2]]),
                               atol=1e-4, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    assert model.stats.host_to_device_bytes > 0


def _intervals(prof, predicate) -> list[tuple[float, float]]:
    out = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and predicate(event.name):
            out.append((event.time_range.start, event.time_range.end))
    return out


def test_the_copy_stream_is_busy_while_compute_runs(wide):
    plan = layout_plan(wide, weights="gcgcgc", kv="gggggg", depth=2, chunk=256, batch_size=4, max_seq_len=300)
    model = offload.load(wide, plan=plan, device="cuda", progress=False)
    rows = [[(i * 7 + b) % 120 + 3 for i in range(256)] for b in range(4)]
    model.generate(rows, max_new_tokens=2)                                  # warm up
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(rows, max_new_tokens=4)
        torch.cuda.synchronize()
    # the layer copies: pinned -> device and long (a ~17 MB layer takes ~0.5 ms); small pageable copies of
    # positions on the compute stream are left out
    copies = [(c0, c1) for c0, c1 in _intervals(prof, lambda name: "Memcpy HtoD" in name and "Pinned" in name)
              if c1 - c0 > 100]                                              # microseconds
    kernels = _intervals(prof, lambda name: "Memcpy" not in name and "Memset" not in name)
    assert copies and kernels
    overlapping = sum(1 for c0, c1 in copies if any(k0 < c1 and c0 < k1 for k0, k1 in kernels))
    assert overlapping >= len(copies) // 2, (overlapping, len(copies))


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5, 0.8])
def test_measured_peak_stays_within_the_plan(wide, fraction):
    """torch.cuda.max_memory_allocated during load and generation <= the plan's GPU total. The measure
    starts from what was allocated before load (other tests' leftovers), with no allowance."""
    spec = placement.load_spec(wide)
    workload = placement.Workload(batch_size=2, prompt_len=96, gen_len=32)
    full = placement.manual_plan(spec, workload)                 # budget = exactly what all-resident needs
    budget = full.budget.gpu_bytes - int(fraction * full.memory.gpu.weights)
    warm = torch.ones(64, 64, device="cuda")
    warm @ warm                                     # cuBLAS's workspace: part of the reserve, not the plan
    del warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = offload.load(wide, gpu_memory=budget, cpu_memory="8GiB", max_batch_size=2, max_seq_len=128,
                         device="cuda", progress=False)
    rows = [[(i * 5 + b) % 120 + 3 for i in range(90 + b)] for b in range(2)]
    model.generate(rows, max_new_tokens=16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert model.ledger.peak_bytes() <= model.plan.memory.gpu.total
    assert peak <= model.plan.memory.gpu.total, (peak, model.plan.memory.gpu.total, model.memory_report())
