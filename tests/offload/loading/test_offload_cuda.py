"""The offloaded runtime on CUDA: pinned host memory for streamed weights and CPU KV, the copy stream busy
while compute runs (profiler timeline), parity with the resident path, and measured peak memory within
the plan's GPU total across several budgets."""
from __future__ import annotations

import gc

import pytest
import torch

import offload
import placement
from offload.weights import host_memory
from offload.attention.host import HostAttention
from offload.attention.streamed import StreamedKVAttention
from tests.offload.builders import build_checkpoint
from tests.offload.offload_plans import EVERY_BACKEND, assert_runs_plan, expected_step_bytes, layout_plan
from tests.offload.loading.test_offload_parity import LONG, NUM_NEW, PROMPTS, reference

pytestmark = pytest.mark.cuda



@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Big enough layers (~17 MB each in float32) that a copy takes a while next to a prefill chunk."""
    path = tmp_path_factory.mktemp("llama_wide_cuda")
    build_checkpoint(path, "llama", num_hidden_layers=6, hidden_size=512, intermediate_size=2048,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return path




def test_offloaded_cuda_matches_resident_and_pins_what_crosses_pcie(llama5):
    """device="cuda" (no index) with CPU-resident KV on both sides: the device asserts of the host-KV
    backends hold (the crash of an unindexed device), and only what crosses PCIe is pinned."""
    gc.collect()
    pinned_before = host_memory.pinned_host_bytes()
    plan = layout_plan(llama5, **EVERY_BACKEND)
    model = offload.load(llama5, plan=plan, device="cuda", progress=False)
    assert model.device == torch.device("cuda", torch.cuda.current_device())
    assert_runs_plan(model, plan)
    weights = model.engine.weights
    assert all(packed.is_pinned for packed in weights.prefetcher.items)       # streamed weights + KV
    # registered in place, exactly: no power-of-two rounding by torch's pinned allocator
    assert host_memory.pinned_host_bytes() - pinned_before == sum(p.num_bytes for p in weights.prefetcher.items)
    for backend in model.engine.backends:
        if isinstance(backend, HostAttention):         # attended where it lies: never crosses PCIe
            assert not backend.k_cache.is_pinned() and not backend.v_cache.is_pinned()
        if isinstance(backend, StreamedKVAttention):
            assert backend.host_k.is_pinned() and backend.host_v.is_pinned()
    resident = offload.load(llama5, device="cuda", dtype="float32", max_batch_size=3, max_seq_len=48,
                            prefill_chunk_size=5, progress=False)
    torch.testing.assert_close(model.forward([LONG, PROMPTS[2]]), resident.forward([LONG, PROMPTS[2]]),
                               atol=1e-4, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    assert model.stats.host_to_device_bytes > 0
    model.close()
    gc.collect()
    assert host_memory.pinned_host_bytes() == pinned_before                  # given back on close


def test_cuda_bytes_per_decode_step_count_the_cpu_attention_outputs(llama5):
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), device="cuda", progress=False)
    bytes_of = {}
    for num_new in (1, 6):
        out = model.generate(PROMPTS[:2], max_new_tokens=num_new)
        assert [len(r) for r in out] == [num_new, num_new]
        bytes_of[num_new] = model.stats.host_to_device_bytes
    assert bytes_of[6] - bytes_of[1] == 5 * expected_step_bytes(model, batch_size=2)
    assert expected_step_bytes(model, batch_size=2) > model.engine.weights.streamed_bytes_per_cycle


def test_generation_makes_no_implicit_sync(llama5):
    """Prefill and decode under torch's sync-debug mode "error": every wait is an explicit event sync."""
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), device="cuda", progress=False)
    want = model.generate(PROMPTS, max_new_tokens=NUM_NEW)                    # warm-up (lazy inits)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = model.generate(PROMPTS, max_new_tokens=NUM_NEW)
        sampled = model.generate(PROMPTS, max_new_tokens=4, temperature=0.8, top_p=0.9, seed=1)
        session = model.session()
        session.generate(PROMPTS[0], max_new_tokens=3)
        session.generate(PROMPTS[1], max_new_tokens=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got == want and all(len(r) == 4 or (len(r) < 4 and r[-1] == 2) for r in sampled)   # eos id 2
    plan = layout_plan(llama5, **EVERY_BACKEND, dtype="float32", quantization="int4")
    quantized = offload.load(llama5, plan=plan, device="cuda", progress=False)
    want = quantized.generate(PROMPTS, max_new_tokens=NUM_NEW)           # packed weights dequantized on the GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert quantized.generate(PROMPTS, max_new_tokens=NUM_NEW) == want
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_quantized_weights_on_cuda_compute_what_the_cpu_computes(llama5):
    """Packed int4/int8 layers, streamed and resident, dequantized next to their matmul on the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for scheme in ("int8", "int4"):
        plan = layout_plan(llama5, **EVERY_BACKEND, dtype="float32", quantization=scheme)
        on_gpu = offload.load(llama5, plan=plan, device="cuda", progress=False)
        on_cpu = offload.load(llama5, plan=plan, device="cpu", progress=False)
        torch.testing.assert_close(on_gpu.forward([LONG, PROMPTS[2]]), on_cpu.forward([LONG, PROMPTS[2]]),
                                   atol=1e-4, rtol=0)
        assert on_gpu.engine.weights.resident_bytes == on_gpu.plan.memory.gpu.weights


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_a_second_device_is_honoured(llama5):
    plan = layout_plan(llama5, **EVERY_BACKEND)
    model = offload.load(llama5, plan=plan, device="cuda:1", progress=False)
    assert model.device == torch.device("cuda", 1)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
    assert all(t.device == torch.device("cuda", 1) for t in model.engine.weights.acquire(1).values())
    model.engine.weights.release(1)


def _intervals(prof, predicate) -> list[tuple[float, float]]:
    out = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and predicate(event.name):
            out.append((event.time_range.start, event.time_range.end))
    return out


def test_the_copy_stream_is_busy_while_compute_runs(wide):
    plan = layout_plan(wide, weights="gcgcgc", kv="gggggg", prefetch_depth=2, chunk=256, batch_size=4, max_seq_len=300)
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


def _start_measuring() -> tuple[int, int]:
    """Warm cuBLAS (its workspace belongs to the CUDA reserve, not the plan), empty the cache, and return
    (allocated, reserved) now, with the peaks reset."""
    warm = torch.ones(64, 64, device="cuda")
    warm @ warm
    del warm
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def _exercise(model) -> None:
    """forward() over a ragged multi-chunk batch, generation, a session: every allocation path."""
    rows = [[(i * 5 + b) % 120 + 3 for i in range(90 + b)] for b in range(model.max_batch_size)]
    model.forward(rows)
    model.generate(rows, max_new_tokens=16)
    model.session().generate(rows[0][:40], max_new_tokens=8)
    torch.cuda.synchronize()


def _check_peaks(model, before: tuple[int, int]) -> None:
    total = model.plan.memory.gpu.total
    peak_allocated = torch.cuda.max_memory_allocated() - before[0]
    peak_reserved = torch.cuda.max_memory_reserved() - before[1]
    assert model.ledger.peak_bytes() <= total
    assert peak_allocated <= total, (peak_allocated, total, model.memory_report())
    assert peak_reserved <= total, (peak_reserved, total, model.memory_report())


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5, 0.8])
def test_measured_peaks_stay_within_the_plan(wide, fraction):
    """torch's peak allocated AND reserved memory during load, forward, generation and a session <= the
    plan's GPU total, measured from before load (other tests' leftovers), with no allowance."""
    spec = placement.load_spec(wide)
    workload = placement.Workload(batch_size=2, prompt_len=96, gen_len=32)
    full = placement.manual_plan(spec, workload)                 # budget = exactly what all-resident needs
    budget = full.budget.gpu_bytes - int(fraction * full.memory.gpu.weights)
    before = _start_measuring()
    model = offload.load(wide, gpu_memory=budget, cpu_memory="8GiB", max_batch_size=2, max_seq_len=128,
                         device="cuda", progress=False)
    _exercise(model)
    _check_peaks(model, before)


def test_measured_peaks_with_cpu_kv_layers_stay_within_the_plan(wide):
    plan = layout_plan(wide, weights="gcgcgc", kv="acgcag", prefetch_depth=2, chunk=32, batch_size=2, max_seq_len=128)
    before = _start_measuring()
    model = offload.load(wide, plan=plan, device="cuda", progress=False)
    _exercise(model)
    _check_peaks(model, before)


def test_the_default_detected_budget_holds_with_room_to_spare(wide):
    """No budget given: the detected one. The plan, and what torch really reserves, stay inside it."""
    before = _start_measuring()
    model = offload.load(wide, max_batch_size=2, max_seq_len=128, device="cuda", progress=False)
    _exercise(model)
    _check_peaks(model, before)
    free, total = torch.cuda.mem_get_info()
    assert model.plan.memory.gpu.total + model.plan.cuda_reserve_bytes <= model.plan.budget.gpu_bytes
    assert model.plan.budget.gpu_bytes <= free + torch.cuda.memory_reserved() - before[1]


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_cpu_computed_layers_on_cuda_match_resident_and_copy_nothing_in_decode(llama5, quantize):
    """Layers decoded on the CPU while the GPU runs the rest: hidden states cross, weights are read in place
    (pinned host views), the KV is attended where it lies; the tokens are the all-GPU path's."""
    kwargs = dict(device="cuda", dtype="float32", max_batch_size=3, max_seq_len=48, prefill_chunk_size=5,
                  progress=False, quantize=quantize)
    resident = offload.load(llama5, **kwargs)
    model = offload.load(llama5, gpu_layers=2, kv_gpu_layers=2, cpu_compute=True, **kwargs)
    assert [l.compute for l in model.plan.layers] == ["gpu", "gpu", "cpu", "cpu", "cpu"]
    want = resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    model.generate([PROMPTS[0]], max_new_tokens=1)                      # warm: prefill only
    weights = model.engine.weights
    weights.reset_stats()
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == want
    size = {item: weights.prefetcher.items[k].num_bytes for k, item in enumerate(weights.streamed_items)}
    num_chunks = -(-max(map(len, PROMPTS)) // 5)
    assert weights.stats.bytes_copied == num_chunks * sum(size[i] for i in (2, 3, 4)) + NUM_NEW * size["lm_head"]
    torch.testing.assert_close(model.forward([LONG]), resident.forward([LONG]), atol=1e-4, rtol=0)
    model.close()
    resident.close()


@pytest.mark.parametrize("placement_", ["cpu", "streamed"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_moe_experts_kept_in_ram_on_cuda_match_resident_within_the_plan(checkpoint_factory, family, placement_):
    """Qwen3-MoE and Qwen2-MoE (a shared expert) on CUDA with their routed experts in pinned RAM: computed on
    the CPU (their rows through the pinned staging, the shared expert queued on the GPU meanwhile), or the
    routed ones copied into the expert slots on the compute stream; the tokens are the all-resident CUDA
    path's and torch's measured peaks stay within the plan (slots included)."""
    path, _ = checkpoint_factory(family)
    kwargs = dict(dtype="float32", max_batch_size=3, max_seq_len=48, device="cuda", progress=False)
    resident = offload.load(path, **kwargs)
    want = resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    resident.close()
    before = _start_measuring()
    model = offload.load(path, experts=placement_, prefill_chunk_size=16, **kwargs)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == want
    assert model.generate([LONG, LONG[3:], LONG[:20]], max_new_tokens=4) == \
        offload.load(path, **kwargs).generate([LONG, LONG[3:], LONG[:20]], max_new_tokens=4)
    assert all(p.is_pinned for p in model.engine.weights.prefetcher.items)
    # experts on the CPU: their outputs came back through the staging (no host KV here to use it otherwise)
    assert (model.engine.staging.host_to_device_bytes > 0) == (placement_ == "cpu")
    torch.cuda.synchronize()
    _check_peaks(model, before)
