"""The prefetcher's scheduling on the CPU fallback (background copy thread): it runs ahead across step
boundaries, never overwrites a held slot, enforces the cyclic order, surfaces copy errors, and stops."""
import random

import pytest
import torch

from offload.weights.host_memory import PackedItem
from offload.weights.prefetch import Prefetcher, PrefetchOrderError

ORDER = ["embedding", 0, 1, 2, 3, 4, "final_norm", "lm_head"]


def make_prefetcher(depth: int, order=ORDER, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sources = {item: {"w": torch.randn(4 + k, 16, generator=g), "b": torch.randn(16, generator=g)}
               for k, item in enumerate(order)}
    packed = [PackedItem.pack(sources[item]) for item in order]
    return Prefetcher(order, packed, device="cpu", prefetch_depth=depth), sources


def assert_intact(views: dict, source: dict) -> None:
    for name, tensor in source.items():
        assert torch.equal(views[name], tensor), name


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_runs_ahead_as_far_as_free_slots_allow_across_the_step_boundary(depth):
    prefetcher, sources = make_prefetcher(depth)
    try:
        # before anything is asked for, the first `depth` items are already on their way
        assert prefetcher.issued_items() == ORDER[:depth]
        assert prefetcher.stats.num_copies == depth
        prefetcher.synchronize()
        assert all(prefetcher.is_ready(item) for item in ORDER[:depth])
        assert not prefetcher.is_ready(ORDER[depth])
        n = len(ORDER)
        for k in range(3 * n):                      # three steps
            item = ORDER[k % n]
            views = prefetcher.acquire(item)
            assert_intact(views, sources[item])
            # while `item` is held, the next depth-1 items are issued without being asked for
            assert prefetcher.issued_items() == [ORDER[(k + j) % n] for j in range(1, depth)]
            prefetcher.release(item)
            # released: its slot was refilled at once with the item `depth` acquisitions ahead,
            # which near the end of a step is the start of the next step
            assert prefetcher.issued_items() == [ORDER[(k + j) % n] for j in range(1, depth + 1)]
            assert prefetcher.stats.num_copies == k + 1 + depth
        prefetcher.synchronize()
        assert prefetcher.is_ready(ORDER[0])        # next step's first item landed unasked
    finally:
        prefetcher.close()


@pytest.mark.parametrize("depth", [2, 3])
def test_a_held_slot_is_never_overwritten(depth):
    """Random acquire/release interleavings (up to `depth` items held at once, released in any order):
    every copy's destination is checked against the slots held at submit time, and every held item's
    bytes are checked after all copies in flight have landed."""
    prefetcher, sources = make_prefetcher(depth)
    engine = prefetcher.copy_engine
    submit = engine.submit
    destinations = []

    def checked_submit(slot, dst, src):
        held_slots = {prefetcher.slot_of(item) for item in prefetcher.held_items()}
        assert slot not in held_slots, f"copy into slot {slot} while it is held"
        for held, views in held_views:
            first = next(iter(views.values()))
            assert not (dst.data_ptr() <= first.data_ptr() < dst.data_ptr() + dst.numel()), held
        destinations.append(slot)
        submit(slot, dst, src)

    engine.submit = checked_submit
    held_views = []                                 # (item, views), oldest acquisition first
    rng = random.Random(1234)
    next_k = 0
    try:
        for _ in range(400):
            if held_views and (len(held_views) == depth or rng.random() < 0.45):
                item = rng.choice(held_views)[0]
                held_views.pop(next(i for i, (held, _) in enumerate(held_views) if held == item))
                prefetcher.release(item)            # releases the oldest acquisition of `item`
            else:
                item = ORDER[next_k % len(ORDER)]
                held_views.append((item, prefetcher.acquire(item)))
                next_k += 1
            assert prefetcher.held_items() == [held for held, _ in held_views]
            prefetcher.synchronize()                # let any (wrong) overwrite land before checking
            for held, views in held_views:
                assert_intact(views, sources[held])
        assert next_k > 3 * len(ORDER) and len(destinations) > 3 * len(ORDER)
    finally:
        prefetcher.close()


def test_out_of_order_acquire_and_release_are_clear_errors():
    prefetcher, sources = make_prefetcher(2)
    try:
        with pytest.raises(PrefetchOrderError, match=r"acquire\(1\) out of order: the next streamed item is "
                                                     r"'embedding'"):
            prefetcher.acquire(1)
        with pytest.raises(PrefetchOrderError, match="not acquired"):
            prefetcher.release("embedding")
        assert_intact(prefetcher.acquire("embedding"), sources["embedding"])   # state unharmed
        prefetcher.acquire(0)
        with pytest.raises(RuntimeError, match="all 2 ring buffers are held by \\['embedding', 0\\]"):
            prefetcher.acquire(1)
        prefetcher.release("embedding")
        assert_intact(prefetcher.acquire(1), sources[1])
    finally:
        prefetcher.close()


def test_a_failed_copy_is_raised_in_acquire_and_reset_recovers():
    prefetcher, sources = make_prefetcher(2)
    engine = prefetcher.copy_engine
    submit = engine.submit
    try:
        prefetcher.synchronize()
        engine.submit = lambda slot, dst, src: submit(slot, dst, src[:-1])      # a size mismatch
        prefetcher.acquire("embedding")
        prefetcher.release("embedding")             # refills slot 0 with item 1: that copy fails
        prefetcher.acquire(0)
        prefetcher.release(0)
        with pytest.raises(RuntimeError, match="prefetch copy into ring slot 0 failed"):
            prefetcher.acquire(1)
        engine.submit = submit
        prefetcher.reset()
        for item in ORDER:
            assert_intact(prefetcher.acquire(item), sources[item])
            prefetcher.release(item)
    finally:
        prefetcher.close()


def test_depth_is_capped_by_the_number_of_streamed_items():
    prefetcher, sources = make_prefetcher(5, order=["final_norm", "lm_head"])
    try:
        assert prefetcher.prefetch_depth == 2
        assert prefetcher.ring_bytes == 2 * prefetcher.slot_bytes
        assert prefetcher.slot_bytes == max(p.num_bytes for p in prefetcher.items)
        for _ in range(3):
            for item in ["final_norm", "lm_head"]:
                assert_intact(prefetcher.acquire(item), sources[item])
            for item in ["final_norm", "lm_head"]:
                prefetcher.release(item)
    finally:
        prefetcher.close()


def test_close_joins_the_copy_thread():
    prefetcher, _ = make_prefetcher(3)
    thread = prefetcher.copy_engine._thread
    assert thread.is_alive()
    prefetcher.close()
    assert not thread.is_alive() and prefetcher.ring_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.acquire("embedding")


def test_bad_arguments():
    packed = [PackedItem.pack({"w": torch.ones(2)})]
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(["a"], packed, device="cpu", prefetch_depth=0)
    with pytest.raises(ValueError, match="one packed item per streamed item"):
        Prefetcher(["a", "b"], packed, device="cpu", prefetch_depth=1)
    with pytest.raises(ValueError, match="repeat"):
        Prefetcher(["a", "a"], packed * 2, device="cpu", prefetch_depth=1)


def test_skip_passes_over_an_item_and_keeps_the_cycle_in_step():
    """skip() frees the item's slot (refilled with the next item due), is not counted as an acquire, and
    obeys the cyclic order like acquire."""
    prefetcher, sources = make_prefetcher(2)
    try:
        for item in ORDER[:-2]:
            prefetcher.acquire(item)
            prefetcher.release(item)
        with pytest.raises(PrefetchOrderError):
            prefetcher.skip("lm_head")                  # final_norm comes first
        prefetcher.skip("final_norm")
        prefetcher.skip("lm_head")
        assert prefetcher.held_items() == []
        assert prefetcher.stats.num_acquires == len(ORDER) - 2
        assert prefetcher.stats.num_copies == len(ORDER) + 2          # the copies were still made
        assert prefetcher.issued_items() == ORDER[:2]                 # next step, ready ahead
        assert_intact(prefetcher.acquire(ORDER[0]), sources[ORDER[0]])
    finally:
        prefetcher.close()


def test_an_announced_skip_makes_no_copy_unless_already_issued():
    """announce_skip marks the next acquisitions of an item: those not yet issued are passed over without
    a copy or a slot; one already issued is copied and then skipped as before."""
    prefetcher, sources = make_prefetcher(2)
    try:
        assert prefetcher.issued_items() == ORDER[:2]
        assert prefetcher.announce_skip(ORDER[1], 3) == 2              # the next one is already issued
        assert prefetcher.announce_skip("lm_head", 2) == 2
        copies = prefetcher.stats.num_copies
        for cycle in range(3):
            for item in ORDER:
                skipped = (item == ORDER[1] and cycle < 3) or (item == "lm_head" and cycle < 2)
                if skipped:
                    prefetcher.skip(item)
                    continue
                assert_intact(prefetcher.acquire(item), sources[item])
                prefetcher.release(item)
        # 3 cycles of len(ORDER) items less the 2 + 2 passed over; the ring is full again at the end
        assert prefetcher.stats.num_copies - copies == 3 * len(ORDER) - 4
        assert prefetcher.issued_items() == ORDER[:2]
        prefetcher.announce_skip(ORDER[2], 1)
        prefetcher.acquire(ORDER[0])
        prefetcher.release(ORDER[0])
        prefetcher.acquire(ORDER[1])
        prefetcher.release(ORDER[1])
        with pytest.raises(PrefetchOrderError, match="announced as skipped"):
            prefetcher.acquire(ORDER[2])
        prefetcher.skip(ORDER[2])
        assert_intact(prefetcher.acquire(ORDER[3]), sources[ORDER[3]])
        with pytest.raises(ValueError, match="not a streamed item"):
            prefetcher.announce_skip("nope", 1)
    finally:
        prefetcher.close()
