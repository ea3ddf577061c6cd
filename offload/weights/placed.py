"""PlacedWeights: the weight source of a placement (items on the "gpu" or the "cpu" tier, as a plan says).

Implements the engine's weight-source contract (see offload/weights/source.py):
`acquire(item) -> {name: tensor}` and `release(item)`, items being decoder-layer indices or
"embedding", "final_norm", "lm_head", acquired in one fixed cyclic order every step.

Each item is placed on one tier of the plan (`placement`), which decides how the engine gets it:
  "gpu"  resident: loaded once onto the compute device; acquire returns the tensors, release does nothing
  "cpu"  streamed: packed into one flat pinned host buffer; copied ahead of use into a ring of
         `prefetch_depth` device buffers by the Prefetcher (CUDA copy stream, or a thread without CUDA);
         or, for the items in `read_in_place`, read where they lie: returned as CPU tensors (the embedding
         table: gathering B rows on the CPU beats holding the table on the GPU)

An item may also carry *attached* host tensors (`attached={item: {name: tensor}}`), e.g. the KV cache of
a layer whose cache lives in host memory but is attended on the GPU: they are packed into the item's
streamed host buffer (so an item with resident weights and attachments is streamed for the attachments
only), copied through the ring with it every cycle, and returned by acquire beside its weights.
`attached_host_tensors(item)` gives their host copies (views into the packed buffer): writes to them are
seen by the item's next copy, provided they are complete before the item is released (see
offload/attention/streamed.py for the ordering argument).
"""
from __future__ import annotations

import weakref
from typing import Hashable, Iterable, Mapping

import torch

from offload.devices import canonical_device
from offload.weights.host_memory import DEFAULT_ALIGNMENT, PackedItem, cast_for_storage
from offload.loading.memory import MemoryLedger
from offload.weights.prefetch import Prefetcher, TransferStats
from offload.weights.quant import flatten, unflatten

GPU, CPU = "gpu", "cpu"                     # the plan's tiers
TIERS = (GPU, CPU)
_RESIDENT, _STREAMED, _IN_PLACE = "resident", "streamed", "in place"   # how an item reaches the compute


class PlacedWeights:
    """Weights placed per item; the engine's weight source.

    items      item -> {name: CPU tensor or QuantizedWeight}, as a mapping or an iterable of (item, tensors) pairs in the
               engine's acquisition order. Consumed one item at a time: an iterable (e.g. a generator
               reading the checkpoint) never has more than one item materialised beyond where it goes.
               A tensor object passed for two items (tied embedding/head) is stored once per way of use.
    placement  item -> "gpu" | "cpu", for every item.
    read_in_place  "cpu" items read where they lie instead of streamed (e.g. {"embedding"}).
    dtype      target dtype for floating tensors (None: keep the checkpoint's).
    device     the compute device ("gpu" tier); the CPU on a machine without CUDA.
    prefetch_depth  ring slots: device buffers, each the size of the largest streamed item.
    pin_memory pin the host copies of streamed items (default: when `device` is CUDA).
    ledger     optional MemoryLedger charged with "weights" (resident) and "buffers" (the ring).
    attached   item -> {name: CPU tensor} streamed with the item every cycle (see the module docstring).
    """

    def __init__(self, items: Mapping[Hashable, Mapping[str, torch.Tensor]] | Iterable,
                 *, placement: Mapping[Hashable, str], dtype: torch.dtype | None, device,
                 prefetch_depth: int = 2, read_in_place=(), pin_memory: bool | None = None,
                 ledger: MemoryLedger | None = None,
                 alignment: int = DEFAULT_ALIGNMENT,
                 attached: Mapping[Hashable, Mapping[str, torch.Tensor]] | None = None):
        self.device = canonical_device(device)
        self.dtype = dtype
        self.placement = dict(placement)
        bad = {item: tier for item, tier in self.placement.items() if tier not in TIERS}
        if bad:
            raise ValueError(f"unknown placement tier(s) {bad}; use one of {TIERS}")
        in_place = set(read_in_place)
        if any(self.placement.get(item) != CPU for item in in_place):
            raise ValueError(f"read_in_place names items not placed on the cpu tier: {sorted(map(str, in_place))}")
        self._modes = {item: _RESIDENT if tier == GPU else _IN_PLACE if item in in_place else _STREAMED
                       for item, tier in self.placement.items()}
        if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"prefetch depth must be an integer >= 1, got {prefetch_depth!r}")
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        self.ledger = ledger
        self._charged = {"weights": 0, "buffers": 0}     # what this object charged to the ledger
        self._is_closed = False
        self.order: list[Hashable] = []
        self._tensors: dict[Hashable, dict[str, torch.Tensor]] = {}   # resident and host items
        self._host_views: dict[Hashable, dict] = {}       # streamed items' host views (host_tensors)
        self._resident_views: dict[Hashable, dict] = {}   # resident items' weight dicts (acquire)
        self.prefetcher: Prefetcher | None = None
        self.streamed_items: tuple[Hashable, ...] = ()    # items in the ring's cycle (weights or attachments)
        sources = {item: dict(tensors) for item, tensors in (attached or {}).items()}
        self.attached = {item: tuple(tensors) for item, tensors in sources.items()}   # item -> names
        for item in sources:
            if self._modes.get(item) not in (_RESIDENT, _STREAMED):
                raise ValueError(f"attached tensors need a resident or streamed item, got {item!r} "
                                 f"({self._modes.get(item)})")
        try:
            self._load(items, sources, prefetch_depth=prefetch_depth, pin_memory=pin_memory, alignment=alignment)
        except BaseException:
            self._credit_ledger()                         # the ledger stays consistent after an error
            raise

    def _load(self, items, sources: dict, *, prefetch_depth: int, pin_memory: bool, alignment: int) -> None:
        streamed: list[Hashable] = []
        packed: list[PackedItem] = []
        stored: dict[tuple[str, int], tuple[weakref.ref, torch.Tensor]] = {}   # (tier, id(src)) -> copy
        pairs = items.items() if isinstance(items, Mapping) else items
        for item, tensors in pairs:
            if item in self._tensors or item in streamed:
                raise ValueError(f"weight item {item!r} given twice")
            if item not in self.placement:
                raise ValueError(f"weight item {item!r} has no placement; placed items: {list(self.placement)}")
            self.order.append(item)
            mode = self._modes[item]
            tensors = flatten(tensors)                    # a quantized matrix is stored as its packed parts
            extra = sources.pop(item, {})                 # packed now, not held afterwards
            clash = set(extra) & set(tensors)
            if clash:
                raise ValueError(f"attached tensor name(s) {sorted(clash)} of item {item!r} clash with "
                                 "its weights")
            if mode == _STREAMED or extra:
                streamed.append(item)
                packed.append(PackedItem.pack({**tensors, **extra} if mode == _STREAMED else extra,
                                              dtype=self.dtype, pin=pin_memory, alignment=alignment))
            if mode != _STREAMED:
                target = self.device if mode == _RESIDENT else torch.device("cpu")
                self._tensors[item] = {name: self._store(mode, tensor, target, stored)
                                       for name, tensor in tensors.items()}
            del tensors, extra                            # drop the source before reading the next item
        missing = [item for item in self.placement if item not in set(self.order)]
        if missing:
            raise ValueError(f"placement names item(s) {missing} that were not given")
        self.streamed_items = tuple(streamed)
        if streamed:
            ring_bytes = Prefetcher.ring_bytes_for(packed, prefetch_depth=prefetch_depth, alignment=alignment)
            self._charge("buffers", ring_bytes)           # checked against the budget before allocating
            self.prefetcher = Prefetcher(streamed, packed, device=self.device, prefetch_depth=prefetch_depth,
                                         alignment=alignment)
            assert self.prefetcher.ring_bytes == ring_bytes

    def _charge(self, category: str, num_bytes: int) -> None:
        if self.ledger is not None:
            self.ledger.allocate(category, num_bytes)
            self._charged[category] += num_bytes

    def _credit_ledger(self) -> None:
        if self.ledger is not None:
            for category, num_bytes in self._charged.items():
                self.ledger.free(category, num_bytes)
        self._charged = dict.fromkeys(self._charged, 0)

    def _store(self, mode: str, tensor: torch.Tensor, target: torch.device,
               stored: dict[tuple[str, int], tuple[weakref.ref, torch.Tensor]]) -> torch.Tensor:
        """The mode's copy of `tensor` (cast, contiguous, on `target`), shared if this object was stored."""
        key = (mode, id(tensor))
        if key in stored and stored[key][0]() is tensor:
            return stored[key][1]
        out_dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        num_bytes = tensor.numel() * out_dtype.itemsize
        if mode == _RESIDENT:
            self._charge("weights", num_bytes)            # checked against the budget before allocating
        copy = cast_for_storage(tensor.detach(), self.dtype).contiguous().to(target)   # no device temp
        stored[key] = (weakref.ref(tensor), copy)
        return copy

    # -- the weight-source contract --------------------------------------------------------------------
    def acquire(self, item: Hashable) -> dict[str, torch.Tensor]:
        """The item's tensors, usable on the compute device (streamed: waits for its copy)."""
        if self._mode(item) == _STREAMED:
            return unflatten(self.prefetcher.acquire(item))
        if item in self.attached:                         # resident weights + streamed attachments
            return unflatten({**self._tensors[item], **self.prefetcher.acquire(item)})
        views = self._resident_views.get(item)
        if views is None:                                 # made once (a QuantizedWeight keeps its CPU matrix)
            views = self._resident_views[item] = unflatten(self._tensors[item])
        return dict(views)

    def release(self, item: Hashable) -> None:
        """Every compute reading the item has been launched; a streamed item's buffer may be refilled."""
        if self.is_streamed(item):
            self.prefetcher.release(item)

    def skip(self, item: Hashable) -> None:
        """The engine passes over `item` this step (e.g. final_norm/lm_head in a prefill chunk without
        logits): keeps the streamed cycle in step. A no-op for resident and host items."""
        if self.is_streamed(item):
            self.prefetcher.skip(item)

    def announce_skips(self, item: Hashable, count: int) -> None:
        """The next `count` uses of `item` will be skip()s: a streamed item is then not copied for them
        (unless its copy is already issued). A no-op for resident and host items."""
        if self.is_streamed(item):
            self.prefetcher.announce_skip(item, count)

    def is_streamed(self, item: Hashable) -> bool:
        """True when the item goes through the ring (its weights are streamed, or it has attachments)."""
        return self._mode(item) == _STREAMED or item in self.attached

    def attached_host_tensors(self, item: Hashable) -> dict[str, torch.Tensor]:
        """The host copies of the item's attached tensors: views into its packed (pinned) host buffer."""
        if item not in self.attached:
            raise KeyError(f"weight item {item!r} has no attached tensors")
        self._mode(item)
        packed = self.prefetcher.items[self.streamed_items.index(item)]
        return {name: view for name, view in packed.tensors().items() if name in self.attached[item]}

    def packed_item(self, item: Hashable):
        """A streamed item's packed host copy (PackedItem: the one buffer its ring copies read)."""
        if self._mode(item) != _STREAMED:
            raise KeyError(f"weight item {item!r} is not streamed: its weights are not kept in host memory")
        return self.prefetcher.items[self.streamed_items.index(item)]

    def host_tensors(self, item: Hashable) -> dict:
        """A streamed item's weights where they lie in host memory (views into its packed host buffer, packed
        matrices as QuantizedWeights), for computing it on the CPU without a copy; its attachments left out."""
        packed = self.packed_item(item)
        views = self._host_views.get(item)
        if views is None:                                 # made once: the packed buffer never moves
            views = self._host_views[item] = unflatten({name: view for name, view in packed.tensors().items()
                                                        if name not in self.attached.get(item, {})})
        return dict(views)

    def _mode(self, item: Hashable) -> str:
        if self._is_closed:
            raise RuntimeError("the weight source is closed")
        mode = self._modes.get(item)
        if mode is None:
            raise KeyError(f"unknown weight item {item!r}; items: {self.order}")
        return mode

    # -- control ---------------------------------------------------------------------------------------
    def reset(self, next_item: Hashable | None = None) -> None:
        """After an interrupted step: wait for copies in flight, drop held buffers, restart the cycle at
        `next_item` (default: the first streamed item). Safe to call at any time."""
        if self.prefetcher is not None:
            if next_item is not None and next_item not in self.streamed_items:
                later = self.order[self.order.index(next_item):] + self.order[:self.order.index(next_item)]
                next_item = next((item for item in later if item in self.streamed_items), None)
            self.prefetcher.reset(next_item)

    def synchronize(self) -> None:
        """Wait (host) for every prefetch copy submitted so far."""
        if self.prefetcher is not None:
            self.prefetcher.synchronize()

    def close(self) -> None:
        """Wait for copies in flight, stop the copy thread and free everything: the device memory (ring,
        resident weights; the ledger is credited) and the host memory (packed streamed items, host-kept
        tensors). Idempotent; acquire afterwards raises."""
        if self._is_closed:
            return
        self._is_closed = True
        self._credit_ledger()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self._tensors = {}
        self._host_views = {}
        self._resident_views = {}

    def __enter__(self) -> "PlacedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounting ------------------------------------------------------------------------------------
    @property
    def stats(self) -> TransferStats:
        """A snapshot of the transfer counters since the last reset_stats()."""
        if self.prefetcher is None:
            return TransferStats()
        return TransferStats(**vars(self.prefetcher.stats))

    def reset_stats(self) -> TransferStats:
        """Zero the counters; returns their values before the reset."""
        before = self.stats
        if self.prefetcher is not None:
            self.prefetcher.stats = TransferStats()
        return before

    def _unique_bytes(self, mode: str) -> int:
        seen = {id(t): t for item, tensors in self._tensors.items() if self._modes[item] == mode
                for t in tensors.values()}
        return sum(t.numel() * t.element_size() for t in seen.values())

    @property
    def resident_bytes(self) -> int:
        """Bytes of resident weights on the compute device."""
        return self._unique_bytes(_RESIDENT)

    @property
    def prefetch_depth(self) -> int:
        """Ring slots (0 when nothing is streamed)."""
        return 0 if self.prefetcher is None else self.prefetcher.prefetch_depth

    @property
    def ring_bytes(self) -> int:
        """Bytes of the prefetch ring on the compute device (prefetch_depth x slot_bytes)."""
        return 0 if self.prefetcher is None else self.prefetcher.ring_bytes

    @property
    def device_bytes(self) -> int:
        """Everything this weight source holds on the compute device."""
        return self.resident_bytes + self.ring_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory held: packed streamed items plus host-kept tensors."""
        return self.streamed_bytes_per_cycle + self._unique_bytes(_IN_PLACE)

    @property
    def streamed_bytes_per_cycle(self) -> int:
        """Bytes copied host->device per full cycle (one step)."""
        return 0 if self.prefetcher is None else sum(p.num_bytes for p in self.prefetcher.items)
