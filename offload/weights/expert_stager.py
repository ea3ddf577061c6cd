"""Routed experts streamed on demand: a decode step copies only the experts its router picked.

A MoE layer whose experts the plan places "streamed" keeps them in CPU RAM as an item of their own (packed,
pinned; prefill chunks stream the whole item through the ring, where nearly every expert is hit). In a decode
step the layer routes its few tokens first, then `fetch(layer, experts)` copies each chosen expert, ONE copy of
its contiguous bytes in the packed host buffer, into one of `num_slots` device slots, and returns the
experts' tensors as views into those slots.

The copies are issued on the compute stream (non-blocking from pinned memory on CUDA): they follow the compute
that last read the slots (the previous MoE layer's experts) and precede the compute that reads them, so no event
is needed. Every expert of every staged layer has the same tensors at the same offsets from its first byte,
so one set of views per slot serves them all (made once).
"""
from __future__ import annotations

from typing import Mapping

import torch

from offload.weights.host_memory import PackedItem, TensorLayout
from offload.weights.quant import unflatten


class ExpertStager:
    """`num_slots` device slots of `slot_bytes` for the routed experts of the layers in `packed`.

    packed   layer -> the packed host copy of its experts item (keys "<experts_prefix><e>.<suffix>").
    experts_prefix  the experts' common key prefix in a layer ("mlp.experts.", "block_sparse_moe.experts.").
    charge   called with the device bytes before they are allocated (the ledger's "buffers")."""

    def __init__(self, packed: Mapping[int, PackedItem], *, experts_prefix: str, num_experts: int, num_slots: int,
                 slot_bytes: int, device: torch.device, charge=None):
        if num_slots < 1 or not packed:
            raise ValueError(f"an expert stager needs layers and at least one slot, got {num_slots} slots for "
                             f"layers {sorted(packed)}")
        self.prefix, self.num_slots, self.slot_bytes = experts_prefix, num_slots, slot_bytes
        self.spans: dict[int, list[tuple[int, int]]] = {}       # layer -> per expert (first byte, end)
        self.host = {layer: item.buffer for layer, item in packed.items()}
        relative = None                                         # the layouts from an expert's first byte
        for layer, item in packed.items():
            spans, layouts = self._split(layer, item, num_experts)
            self.spans[layer] = spans
            if relative is None:
                relative = layouts
            elif layouts != relative:
                raise ValueError(f"layer {layer}'s experts are not laid out like layer {min(packed)}'s")
        need = max(end - start for spans in self.spans.values() for start, end in spans)
        if need > slot_bytes:
            raise ValueError(f"an expert takes {need} bytes packed, more than the plan's expert slot of "
                             f"{slot_bytes} bytes; was the plan made for another checkpoint or dtype?")
        if charge is not None:
            charge(num_slots * slot_bytes)
        self.buffer = torch.empty(num_slots * slot_bytes, dtype=torch.uint8, device=device)
        slots = [self.buffer[s * slot_bytes:(s + 1) * slot_bytes] for s in range(num_slots)]
        self._views = [unflatten({layout.name: layout.view_of(slot) for layout in relative}) for slot in slots]
        self._slots = slots
        self.bytes_copied = 0                                  # host->device bytes since creation

    def _split(self, layer: int, item: PackedItem, num_experts: int):
        """Per expert its (first byte, end) in the packed buffer, and expert 0's layouts relative to its first
        byte (names less "<prefix><e>."); checks that every expert's tensors are contiguous and alike."""
        by_expert: dict[int, list[TensorLayout]] = {}
        for layout in item.layouts:
            head, _, rest = layout.name.partition(self.prefix)
            expert = rest.split(".", 1)[0]
            if head or not expert.isdigit():
                raise ValueError(f"layer {layer}: {layout.name!r} is not a routed expert's tensor "
                                 f"({self.prefix}<e>.*)")
            by_expert.setdefault(int(expert), []).append(layout)
        if sorted(by_expert) != list(range(num_experts)):
            raise ValueError(f"layer {layer} holds experts {sorted(by_expert)}, expected 0..{num_experts - 1}")
        spans, first = [], None
        for e in range(num_experts):
            layouts = sorted(by_expert[e], key=lambda t: t.offset)
            start, end = layouts[0].offset, layouts[-1].offset + layouts[-1].num_bytes
            strip = len(f"{self.prefix}{e}.")
            relative = tuple(TensorLayout(name=t.name[strip:], dtype=t.dtype, shape=t.shape, offset=t.offset - start)
                             for t in layouts)
            if first is None:
                first = relative
            elif relative != first:
                raise ValueError(f"layer {layer}: expert {e}'s tensors differ from expert 0's")
            spans.append((start, end))
        order = sorted(spans)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(order, order[1:])):
            raise ValueError(f"layer {layer}: the experts' tensors are interleaved in the packed buffer")
        return spans, first

    def fetch(self, layer: int, experts: list[int]) -> dict:
        """Copy `experts` (distinct, at most num_slots) of `layer` to the device; their tensors keyed as in the
        layer's weights ("<prefix><e>.<name>.weight"), packed matrices as QuantizedWeights, valid until the next
        fetch's copies (the compute stream orders them)."""
        assert len(experts) <= self.num_slots and len(set(experts)) == len(experts), (experts, self.num_slots)
        spans, host = self.spans[layer], self.host[layer]
        out = {}
        for slot, e in enumerate(experts):
            start, end = spans[e]
            self._slots[slot][:end - start].copy_(host[start:end], non_blocking=True)   # one copy per expert
            self.bytes_copied += end - start
            out.update({f"{self.prefix}{e}.{name}": value for name, value in self._views[slot].items()})
        return out

    @property
    def device_bytes(self) -> int:
        return self.buffer.numel()

    def close(self) -> None:
        self.buffer, self._slots, self._views, self.host = None, [], [], {}
