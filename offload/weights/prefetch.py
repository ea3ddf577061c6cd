"""The prefetcher: streamed items copied ahead of use into a ring of device buffers.

The engine uses the streamed items in one fixed cyclic order (embedding, layers, final norm, head, then
again next step), so the k-th streamed acquisition since the start is item `order[k % n]`. Copies are
issued in that order, each into the slot freed longest ago, as soon as one is free: the copies run ahead
as far as free slots allow, across the end of a step into the next. Releases may come in any order.

Slot life cycle:  free --submit--> copying/ready --acquire--> held --release--> free.
A slot is only ever submitted to when free, so a held slot is never overwritten; on CUDA the copy
stream additionally waits for the compute-done event recorded at release (see copy_engine.py).

An acquisition announced ahead as skipped (`announce_skip`: the LM head of a prefill chunk that needs no
logits) is passed over without a copy when its turn to be issued comes; one issued before the
announcement is copied and then skipped (its copy cannot be called back).

Teardown: `close()` waits for the copies in flight and frees the ring and the host copies. A prefetcher
dropped without `close()` does the same from a finalizer, and the ring is recorded on the copy stream, so
the caching allocator never hands its memory out while a copy may still write into it.

Not thread-safe: one compute thread calls acquire/release (the copy engine has its own thread or stream).
"""
from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from offload.devices import canonical_device
from offload.weights.copy_engine import make_copy_engine
from offload.weights.host_memory import DEFAULT_ALIGNMENT, PackedItem, align_up


class PrefetchOrderError(RuntimeError):
    """A streamed item was acquired or released out of the fixed cyclic order."""


@dataclass
class TransferStats:
    """Counters since the last reset: host->device copies issued, bytes, host seconds blocked in acquire."""

    num_copies: int = 0
    bytes_copied: int = 0
    wait_seconds: float = 0.0
    num_acquires: int = 0

    def __post_init__(self):
        if self.num_copies < 0 or self.bytes_copied < 0 or self.wait_seconds < 0 or self.num_acquires < 0:
            raise ValueError(f"transfer counters must be >= 0, got {self}")


class Prefetcher:
    """A ring of `prefetch_depth` device buffers of `slot_bytes` each, filled ahead of use from packed host items.

    `items[i]` is the packed host copy of `order[i]`; `order` is the cyclic order of acquisition.
    """

    def __init__(self, order: Sequence[Hashable], items: Sequence[PackedItem], *, device, prefetch_depth: int,
                 alignment: int = DEFAULT_ALIGNMENT):
        if len(order) != len(items) or not order:
            raise ValueError(f"need one packed item per streamed item, got {len(items)} for {len(order)}")
        if len(set(order)) != len(order):
            raise ValueError(f"streamed items repeat in the order {list(order)}")
        if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"prefetch depth must be an integer >= 1, got {prefetch_depth!r}")
        self.order = tuple(order)
        self.items = tuple(items)
        self._position = {item: i for i, item in enumerate(self.order)}
        self.device = canonical_device(device)
        # more slots than items would only hold a second copy of an item already in flight
        self.prefetch_depth = min(prefetch_depth, len(self.order))
        self.slot_bytes = self.ring_bytes_for(self.items, prefetch_depth=1, alignment=alignment)
        self.ring = torch.empty(self.prefetch_depth * self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._slots = [self.ring[s * self.slot_bytes:(s + 1) * self.slot_bytes] for s in range(self.prefetch_depth)]
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}   # (slot, position) -> views
        self._engine = make_copy_engine(self.device, self.prefetch_depth)
        self._engine.adopt(self.ring)
        # dropped without close(): still wait for the copies in flight (and stop the copy thread)
        self._finalizer = weakref.finalize(self, self._engine.close)
        self.stats = TransferStats()
        self._is_closed = False
        self._start(0)

    # -- scheduling ------------------------------------------------------------------------------------
    def _start(self, first: int) -> None:
        """Empty ring; the next acquisition and the next copy are both `order[first]`."""
        self._free_slots: deque[int] = deque(range(self.prefetch_depth))   # free slots, freed longest ago first
        self._issued: dict[int, int] = {}                         # acquisition number -> slot, not acquired
        self._held: dict[int, int] = {}                           # acquisition number -> slot, held now
        self._skipped: set[int] = set()                           # acquisition numbers announced skipped
        self._num_acquired = first                                # next acquisition number
        self._num_issued = first                                  # next copy's acquisition number
        self._fill()

    def _fill(self) -> None:
        """Submit copies into free slots, in order, as far as they go (announced skips take no slot).

        Never more than `prefetch_depth` acquisitions ahead, skips included: while an item is held, its own next
        copy must not be issued (an attached host KV cache is written back before the release)."""
        while len(self._held) + self._num_issued - self._num_acquired < self.prefetch_depth:
            seq = self._num_issued
            if seq in self._skipped:
                self._issued[seq] = None                    # passed over: no copy, no slot
                self._num_issued += 1
                continue
            if not self._free_slots:
                return
            slot = self._free_slots.popleft()
            packed = self.items[seq % len(self.order)]
            assert slot not in self._held.values(), f"slot {slot} is held and would be overwritten"
            assert packed.buffer.device.type == "cpu" and packed.buffer.dtype == torch.uint8
            self._engine.submit(slot, self._slots[slot][:packed.num_bytes], packed.buffer)
            self._issued[seq] = slot
            self._num_issued += 1
            self.stats.num_copies += 1
            self.stats.bytes_copied += packed.num_bytes

    def acquire(self, item: Hashable) -> dict[str, torch.Tensor]:
        """The item's tensors as views into its ring slot, usable by compute on the current stream."""
        self._check_open()
        seq = self._num_acquired
        position = seq % len(self.order)
        if self._position.get(item) != position:
            raise PrefetchOrderError(
                f"acquire({item!r}) out of order: the next streamed item is {self.order[position]!r} "
                f"(streamed items are acquired in the fixed cyclic order {list(self.order)}); "
                "call reset() after an interrupted step")
        if seq in self._skipped:
            raise PrefetchOrderError(f"acquire({item!r}): this acquisition was announced as skipped "
                                     "(announce_skip); call skip() for it")
        if seq not in self._issued:         # every slot is held (copies are issued in acquisition order)
            held = [self.order[s % len(self.order)] for s in sorted(self._held)]
            raise RuntimeError(f"cannot acquire {item!r}: all {self.prefetch_depth} ring buffers are held by {held}; "
                               "release one first or use a deeper prefetch ring")
        slot = self._issued[seq]
        self.stats.wait_seconds += self._engine.wait_copy(slot)
        del self._issued[seq]
        self.stats.num_acquires += 1
        self._num_acquired += 1
        self._held[seq] = slot
        key = (slot, position)
        if key not in self._views:
            self._views[key] = self.items[position].views_of(self._slots[slot])
        return dict(self._views[key])

    def release(self, item: Hashable) -> None:
        """Every compute reading `item` has been launched: its slot may be refilled after that compute."""
        self._check_open()
        held = [seq for seq in sorted(self._held) if self.order[seq % len(self.order)] == item]
        if not held:
            raise PrefetchOrderError(f"release({item!r}): the item is not acquired")
        slot = self._held.pop(held[0])
        self._engine.record_release(slot)
        self._free_slots.append(slot)
        self._fill()

    def skip(self, item: Hashable) -> None:
        """Pass over the next streamed item without using it (e.g. the head during a prefill chunk that
        needs no logits). Announced ahead (announce_skip) and not yet issued then: no copy at all;
        otherwise its slot is freed once its copy has landed. Same order rule as acquire."""
        self._check_open()
        seq = self._num_acquired
        if seq in self._skipped and self._position.get(item) == seq % len(self.order):
            self._skipped.discard(seq)
            self._issued.pop(seq, None)
            self._num_acquired += 1
            self._fill()
            return
        self.acquire(item)
        self.release(item)
        self.stats.num_acquires -= 1

    def announce_skip(self, item: Hashable, count: int) -> int:
        """The next `count` acquisitions of `item` will be `skip()`s: those not issued yet are passed over
        without copying. Returns how many were marked (an issued copy cannot be called back)."""
        self._check_open()
        position = self._position.get(item)
        if position is None:
            raise ValueError(f"announce_skip({item!r}): not a streamed item; streamed: {list(self.order)}")
        n = len(self.order)
        first = self._num_acquired + (position - self._num_acquired) % n   # next acquisition of item
        marked = [first + k * n for k in range(count) if first + k * n >= self._num_issued]
        self._skipped.update(marked)
        return len(marked)

    def reset(self, next_item: Hashable | None = None) -> None:
        """Bring the ring back to a consistent state after an interrupted step (e.g. an exception in compute).

        Waits for copies in flight, drops every held buffer and restarts prefetching at `next_item`
        (default: the first item of the cycle).
        """
        self._check_open()
        first = 0 if next_item is None else self._position.get(next_item)
        if first is None:
            raise ValueError(f"reset({next_item!r}): not a streamed item; streamed: {list(self.order)}")
        for slot in self._held.values():
            self._engine.record_release(slot)
        self._engine.synchronize()
        self._engine.clear_errors()
        self._start(first)

    def synchronize(self) -> None:
        """Wait (host) for every copy submitted so far."""
        self._engine.synchronize()

    def close(self) -> None:
        """Wait for copies in flight, stop the copy thread, free the ring and drop the host copies (their
        memory is returned once nothing else references it); idempotent."""
        if not self._is_closed:
            self._is_closed = True
            self._finalizer()                               # engine.close(), once
            self.ring, self._slots, self._views, self.items = None, [], {}, ()

    def _check_open(self) -> None:
        if self._is_closed:
            raise RuntimeError("the prefetcher is closed")

    # -- introspection (tests, stats) ------------------------------------------------------------------
    def issued_items(self) -> list[Hashable]:
        """Items copied or being copied into a slot and not yet acquired, in acquisition order."""
        return [self.order[seq % len(self.order)] for seq in range(self._num_acquired, self._num_issued)
                if self._issued.get(seq) is not None]

    def held_items(self) -> list[Hashable]:
        return [self.order[seq % len(self.order)] for seq in sorted(self._held)]

    def is_ready(self, item: Hashable) -> bool:
        """True when the next acquisition of `item` is already issued and its copy has completed."""
        for seq in range(self._num_acquired, self._num_issued):
            if self.order[seq % len(self.order)] == item and self._issued[seq] is not None:
                return self._engine.is_copy_done(self._issued[seq])
        return False

    def slot_of(self, item: Hashable) -> int | None:
        """The ring slot holding (or receiving) the next or current copy of `item`, None if none does."""
        for seq, slot in sorted(self._held.items()):
            if self.order[seq % len(self.order)] == item:
                return slot
        for seq, slot in sorted(self._issued.items()):
            if self.order[seq % len(self.order)] == item and slot is not None:
                return slot
        return None

    @property
    def copy_engine(self):
        return self._engine

    @property
    def ring_bytes(self) -> int:
        """Device bytes held by the ring (0 once closed)."""
        return 0 if self.ring is None else self.ring.numel()

    @staticmethod
    def ring_bytes_for(items: Sequence[PackedItem], *, prefetch_depth: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
        """Device bytes of the ring a Prefetcher over `items` allocates (before allocating it)."""
        slot_bytes = align_up(max(item.num_bytes for item in items), alignment) or alignment
        return min(prefetch_depth, len(items)) * slot_bytes
