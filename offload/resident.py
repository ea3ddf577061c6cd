"""ResidentWeights: every weight loaded once onto one device (the plain, non-offloaded weight source)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from offload.checkpoint import Checkpoint
from offload.weight_source import Item, item_tensors, weight_items


class ResidentWeights:
    """All items held on `device` in `dtype`; acquire is a dict lookup, release does nothing."""

    def __init__(self, items: dict[Item, dict[str, torch.Tensor]]):
        self._items = items

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, dtype: torch.dtype, device,
                        progress: bool = True) -> "ResidentWeights":
        """Read tensor by tensor (each converted and moved before the next is read); tied heads shared."""
        arch = checkpoint.arch
        items: dict[Item, dict[str, torch.Tensor]] = {}
        loaded: dict[str, torch.Tensor] = {}           # checkpoint name -> tensor, to share tied tables
        for item in tqdm(weight_items(arch), desc=f"loading {checkpoint.path.name}", unit="item",
                         disable=not progress, leave=False):
            tensors = {}
            for key, name in item_tensors(arch, item).items():
                if name not in loaded:
                    loaded[name] = checkpoint.read(name, dtype).to(device).contiguous()
                tensors[key] = loaded[name]
            items[item] = tensors
        return cls(items)

    def acquire(self, item: Item) -> dict[str, torch.Tensor]:
        return self._items[item]

    def release(self, item: Item) -> None:
        if item not in self._items:
            raise KeyError(f"release of unknown weight item {item!r}")

    @property
    def total_bytes(self) -> int:
        seen = {id(t): t for tensors in self._items.values() for t in tensors.values()}
        return sum(t.numel() * t.element_size() for t in seen.values())
