"""PlacedWeights on the CPU fallback: every item bit-identical after the round trip, for every placement,
prefetch depth and dtype, over many cycles; tied heads; lazy consumption; ledger; errors; reset; close."""
import weakref

import pytest
import torch

from offload.weights.host_memory import DEFAULT_ALIGNMENT, align_up
from offload.loading.memory import MemoryBudgetError, MemoryLedger
from offload.weights.prefetch import PrefetchOrderError
from offload.weights.placed import PlacedWeights

NUM_LAYERS = 4


def make_items(num_layers: int = NUM_LAYERS, hidden: int = 8, vocab: int = 24, tied: bool = False,
               seed: int = 0) -> dict:
    """A tiny model's items, in the engine's order; layers differ in size so slots size to the largest."""
    g = torch.Generator().manual_seed(seed)
    items = {"embedding": {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}}
    for i in range(num_layers):
        inter = 2 * hidden + 4 * i                      # layer i is bigger than layer i-1
        items[i] = {
            "self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g),
            "self_attn.q_proj.bias": torch.randn(hidden, generator=g),
            "mlp.up_proj.weight": torch.randn(inter, hidden, generator=g),
            "input_layernorm.weight": torch.randn(hidden, generator=g),
            "rotary.step": torch.tensor(i + 7, dtype=torch.int64),           # integers are never cast
        }
    items["final_norm"] = {"model.norm.weight": torch.randn(hidden, generator=g)}
    head = items["embedding"]["model.embed_tokens.weight"] if tied else torch.randn(vocab, hidden, generator=g)
    items["lm_head"] = {"lm_head.weight": head}
    return items


def expected(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def assert_item_equal(got: dict, want: dict, dtype: torch.dtype, item) -> None:
    assert set(got) == set(want), item
    for name, tensor in want.items():
        ref = expected(tensor, dtype)
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, (item, name)
        # bit-identical: compare the raw bytes, not values
        assert torch.equal(got[name].cpu().reshape(-1).view(torch.uint8),
                           ref.contiguous().reshape(-1).view(torch.uint8)), (item, name)


def run_cycles(weights: PlacedWeights, items: dict, dtype: torch.dtype, num_cycles: int) -> None:
    for _ in range(num_cycles):
        for item in items:
            assert_item_equal(weights.acquire(item), items[item], dtype, item)
            weights.release(item)


PLACEMENTS = {     # name -> item -> tier, as a plan says ("gpu" resident, "cpu" streamed unless read in place)
    "all_streamed": lambda items: dict.fromkeys(items, "cpu"),
    "all_resident": lambda items: dict.fromkeys(items, "gpu"),
    "mixed": lambda items: {item: ("gpu" if item in (0, 2, "final_norm") else "cpu") for item in items},
    "host_embedding": lambda items: {item: ("gpu" if item == 1 else "cpu") for item in items},
}
IN_PLACE = {"host_embedding": ("embedding",)}     # "cpu" items read where they lie


def placed(items, name: str, **kwargs) -> PlacedWeights:
    """PlacedWeights over `items` with the named placement."""
    return PlacedWeights(items, placement=PLACEMENTS[name](items), read_in_place=IN_PLACE.get(name, ()), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_round_trip_bit_identical_over_many_cycles(placement, depth, dtype):
    items = make_items()
    with placed(items, placement, dtype=dtype, device="cpu", prefetch_depth=depth) as weights:
        run_cycles(weights, items, dtype, num_cycles=5)
        num_streamed = len(weights.streamed_items)
        if num_streamed:
            # every streamed item copied once per cycle, plus what the ring prefetched into the next one
            assert 5 * num_streamed <= weights.stats.num_copies <= 5 * num_streamed + depth


@pytest.mark.parametrize("tier", ["resident", "in_place", "streamed"])
def test_tied_head_returns_the_embedding_table(tier):
    items = make_items(tied=True)
    placement = dict.fromkeys(items, "gpu" if tier == "resident" else "cpu")
    in_place = items if tier == "in_place" else ()
    with PlacedWeights(items, placement=placement, read_in_place=in_place, dtype=torch.bfloat16, device="cpu",
                       prefetch_depth=2) as weights:
        table = weights.acquire("embedding")["model.embed_tokens.weight"]
        weights.release("embedding")
        for i in range(NUM_LAYERS):
            weights.acquire(i)
            weights.release(i)
        weights.acquire("final_norm")
        head = weights.acquire("lm_head")["lm_head.weight"]
        assert torch.equal(head, items["embedding"]["model.embed_tokens.weight"].to(torch.bfloat16))
        if tier != "streamed":      # stored once: the very same tensor
            assert head.data_ptr() == table.data_ptr()
            assert weights.resident_bytes + weights.host_bytes == (
                sum(t.numel() * 2 for i, d in items.items() if i != "lm_head" for t in d.values()
                    if t.is_floating_point()) + 8 * NUM_LAYERS)


def test_a_generator_is_consumed_one_item_at_a_time():
    items = make_items()
    refs = []

    def read():                                     # like a checkpoint reader: fresh tensors per item
        for item, tensors in items.items():
            for earlier in refs:                   # every item handed over before is freed already
                assert earlier() is None, "PlacedWeights kept a source tensor of an earlier item"
            fresh = {name: t.clone() for name, t in tensors.items()}
            refs.append(weakref.ref(fresh[next(iter(fresh))]))
            yield item, fresh
            del fresh                              # this reader keeps nothing once resumed

    with PlacedWeights(read(), placement=dict.fromkeys(items, "cpu"), dtype=torch.float16,
                       device="cpu", prefetch_depth=2) as weights:
        assert weights.order == list(items)
        run_cycles(weights, items, torch.float16, num_cycles=2)


def test_ledger_charges_resident_weights_and_the_ring():
    items = make_items()
    placement = PLACEMENTS["mixed"](items)
    ledger = MemoryLedger()
    weights = PlacedWeights(items, placement=placement, dtype=torch.float16, device="cpu", prefetch_depth=3,
                            ledger=ledger)
    resident = sum(expected(t, torch.float16).numel() * expected(t, torch.float16).element_size()
                   for i, d in items.items() if placement[i] == "gpu" for t in d.values())
    packed = [sum(align_up(expected(t, torch.float16).numel() * expected(t, torch.float16).element_size(),
                           DEFAULT_ALIGNMENT) for t in d.values())
              for i, d in items.items() if placement[i] == "cpu"]
    assert ledger.current_bytes("weights") == weights.resident_bytes == resident
    assert ledger.current_bytes("buffers") == weights.ring_bytes == 3 * max(packed)
    assert weights.streamed_bytes_per_cycle == sum(packed)
    assert ledger.peak_bytes() == resident + 3 * max(packed)
    weights.close()
    assert ledger.current_bytes() == 0 and ledger.peak_bytes() == resident + 3 * max(packed)


def test_budget_too_small_fails_before_allocating_and_leaves_the_ledger_clean():
    items = make_items()
    ledger = MemoryLedger(max_bytes=1024)
    ledger.allocate("kv_cache", 100)
    with pytest.raises(MemoryBudgetError, match="over its budget"):
        placed(items, "mixed", dtype=torch.float32, device="cpu", prefetch_depth=2, ledger=ledger)
    assert ledger.current_bytes() == 100 and ledger.current_bytes("weights") == 0


def test_bad_placements_are_clear_errors():
    items = make_items()
    with pytest.raises(ValueError, match="unknown placement tier"):
        PlacedWeights(items, placement={**dict.fromkeys(items, "cpu"), 0: "resident"}, dtype=None, device="cpu")
    with pytest.raises(ValueError, match="has no placement"):
        PlacedWeights(items, placement={i: "cpu" for i in items if i != 3}, dtype=None, device="cpu")
    with pytest.raises(ValueError, match="were not given"):
        PlacedWeights(items, placement={**dict.fromkeys(items, "cpu"), 99: "gpu"}, dtype=None,
                      device="cpu")
    with pytest.raises(ValueError, match="given twice"):
        PlacedWeights([(0, items[0]), (0, items[0])], placement={0: "cpu"}, dtype=None, device="cpu")
    with pytest.raises(ValueError, match="depth"):
        PlacedWeights(items, placement=dict.fromkeys(items, "cpu"), dtype=None, device="cpu", prefetch_depth=0)
    with pytest.raises(ValueError, match="not placed on the cpu tier"):
        PlacedWeights(items, placement=dict.fromkeys(items, "gpu"), read_in_place=["embedding"], dtype=None,
                      device="cpu")


def test_reset_after_an_exception_in_compute_makes_the_next_step_work():
    items = make_items()
    placement = PLACEMENTS["mixed"](items)
    with PlacedWeights(items, placement=placement, dtype=torch.float32, device="cpu", prefetch_depth=2) as weights:
        run_cycles(weights, items, torch.float32, num_cycles=1)
        with pytest.raises(ZeroDivisionError):      # a step interrupted while layer 1 is held
            for item in items:
                weights.acquire(item)
                if item == 1:
                    raise ZeroDivisionError
                weights.release(item)
        with pytest.raises(PrefetchOrderError, match="call reset"):
            weights.acquire("embedding")           # without reset the cycle is out of step
        weights.reset()
        run_cycles(weights, items, torch.float32, num_cycles=2)
        weights.reset(next_item=2)                  # resident: restarts at the next streamed item (3)
        for item in [2, 3, "final_norm", "lm_head"]:
            assert_item_equal(weights.acquire(item), items[item], torch.float32, item)
            weights.release(item)
        run_cycles(weights, items, torch.float32, num_cycles=1)


def test_skip_keeps_the_cycle_in_step():
    items = make_items()
    with PlacedWeights(items, placement=dict.fromkeys(items, "cpu"), dtype=torch.float32, device="cpu",
                       prefetch_depth=2) as weights:
        for _ in range(3):                          # prefill chunks that need no logits
            for item in ["embedding", *range(NUM_LAYERS)]:
                assert_item_equal(weights.acquire(item), items[item], torch.float32, item)
                weights.release(item)
            weights.skip("final_norm")
            weights.skip("lm_head")
        run_cycles(weights, items, torch.float32, num_cycles=1)
        with pytest.raises(PrefetchOrderError):
            weights.skip(2)


def test_stats_count_copies_and_reset():
    items = make_items()
    placement = PLACEMENTS["mixed"](items)
    with PlacedWeights(items, placement=placement, dtype=torch.float32, device="cpu", prefetch_depth=2) as weights:
        weights.synchronize()
        weights.reset_stats()
        run_cycles(weights, items, torch.float32, num_cycles=3)
        stats = weights.reset_stats()
        num_streamed = len(weights.streamed_items)
        assert stats.num_acquires == 3 * num_streamed
        # after the warm-up copies, each release refills one slot: exactly one copy per streamed acquisition
        assert stats.num_copies == 3 * num_streamed
        assert stats.bytes_copied == 3 * weights.streamed_bytes_per_cycle
        assert weights.stats.num_copies == 0 and weights.stats.bytes_copied == 0


def test_close_stops_the_thread_and_acquire_then_raises():
    items = make_items()
    weights = PlacedWeights(items, placement=dict.fromkeys(items, "cpu"), dtype=None, device="cpu", prefetch_depth=2)
    engine = weights.prefetcher.copy_engine
    assert engine.is_alive
    weights.close()
    assert not engine.is_alive
    weights.close()                                 # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        weights.acquire("embedding")


def test_unknown_item_is_a_clear_error():
    items = make_items()
    with PlacedWeights(items, placement=dict.fromkeys(items, "gpu"), dtype=None, device="cpu") as weights:
        with pytest.raises(KeyError, match="unknown weight item 'head'"):
            weights.acquire("head")
