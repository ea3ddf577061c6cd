"""The CUDA path of PlacedWeights: pinned host copies, a dedicated copy stream, copies that overlap
compute, slots protected by compute-done events, and device memory = resident + depth x slot."""
import time

import pytest
import torch

from offload.loading.memory import DevicePeakMeter, MemoryLedger
from offload.weights.placed import PlacedWeights
from tests.offload.weights.test_placed import IN_PLACE, PLACEMENTS, make_items, placed, run_cycles

pytestmark = pytest.mark.cuda

SPIN_CYCLES = 4_000_000_000      # torch.cuda._sleep: ~2 s of GPU time at 2 GHz, far longer than a copy


def big_items(num_items: int = 3, mib: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    numel = mib * (1 << 20) // 2
    return {i: {"w": torch.randn(numel, generator=g, dtype=torch.float32).to(torch.float16)}
            for i in range(num_items)}


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("placement", ["all_streamed", "mixed", "host_embedding"])
def test_round_trip_on_cuda(placement, depth):
    items = make_items()
    with placed(items, placement, dtype=torch.bfloat16, device="cuda", prefetch_depth=depth) as weights:
        run_cycles(weights, items, torch.bfloat16, num_cycles=4)
        for item in items:
            tensors = weights.acquire(item)
            want = "cpu" if item in IN_PLACE.get(placement, ()) else "cuda"
            assert all(t.device.type == want for t in tensors.values()), item
            weights.release(item)
        assert weights.stats.wait_seconds == 0.0     # CUDA: the stream waits, the host never does


def test_host_copies_are_pinned_and_copies_run_on_their_own_stream():
    items = make_items()
    with PlacedWeights(items, placement=dict.fromkeys(items, "cpu"), dtype=torch.float16, device="cuda",
                       prefetch_depth=2) as weights:
        assert all(packed.is_pinned for packed in weights.prefetcher.items)
        copy_stream = weights.prefetcher.copy_engine.stream
        assert copy_stream.cuda_stream != torch.cuda.current_stream().cuda_stream


def test_next_copy_overlaps_compute_and_a_slot_waits_for_the_compute_reading_it():
    items = big_items()
    with PlacedWeights(items, placement=dict.fromkeys(items, "cpu"), dtype=torch.float16, device="cuda",
                       prefetch_depth=2) as weights:
        prefetcher = weights.prefetcher
        weights.synchronize()
        weights.acquire(0)
        weights.release(0)                          # slot of item 0 refilled with item 2 at once
        w1 = weights.acquire(1)["w"]
        torch.cuda._sleep(SPIN_CYCLES)              # long "compute" on the compute stream, reading item 1
        snapshot = w1.clone()                       # what the compute read from item 1's slot
        compute_done = torch.cuda.Event()
        compute_done.record()
        weights.release(1)                          # item 1's slot -> item 0 of the next step, after compute
        deadline = time.monotonic() + 30.0
        while not prefetcher.is_ready(2):           # item 2's copy lands while compute is still running
            assert time.monotonic() < deadline, "copy of item 2 never completed"
            time.sleep(0.001)
        assert not compute_done.query(), "compute finished before the copy: lengthen SPIN_CYCLES"
        # the copy into item 1's slot waits for the compute that reads it
        assert not prefetcher.is_ready(0)
        torch.cuda.synchronize()
        assert prefetcher.is_ready(0)
        assert torch.equal(snapshot.cpu(), items[1]["w"])  # the slot was not refilled under the compute
        for item in [2, 0, 1, 2]:
            assert torch.equal(weights.acquire(item)["w"].cpu(), items[item]["w"])
            weights.release(item)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_device_memory_is_resident_plus_the_ring(depth):
    items = make_items(num_layers=6, hidden=256, vocab=4096)
    placement = PLACEMENTS["mixed"](items)
    num_resident_tensors = sum(len(d) for i, d in items.items() if placement[i] == "gpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    ledger = MemoryLedger()
    with DevicePeakMeter("cuda") as meter:
        weights = PlacedWeights(items, placement=placement, dtype=torch.float16, device="cuda", prefetch_depth=depth,
                                ledger=ledger)
        run_cycles(weights, items, torch.float16, num_cycles=3)
        weights.synchronize()
    assert ledger.peak_bytes() == weights.resident_bytes + weights.ring_bytes
    # the caching allocator rounds each block up to 512 bytes; nothing else may be allocated
    assert weights.device_bytes <= meter.peak_bytes <= ledger.peak_bytes() + 512 * (num_resident_tensors + 1)
    weights.close()
