"""The weight-source contract: how the engine gets weights, whatever memory they live in.

A weight source is called by the engine in a fixed order for every chunk it runs:

    acquire(item) -> dict[str, Tensor]   # blocks until the tensors are usable on the compute device
    release(item) -> None                # every compute reading them has been launched
    skip(item) -> None                   # the item's turn passes unused (the head of a prefill chunk)
    announce_skips(item, count)          # said ahead of those skips, so nothing is copied for them

`item` is an int decoder-layer index, one of "embedding", "final_norm", "lm_head", or ("experts", i): the routed
experts of MoE layer i when the plan keeps them on the CPU (experts_item; otherwise they are part of item i).
In a decode step, the dict of a layer whose experts are streamed on demand has no routed experts but, under
ROUTED_EXPERTS, a function: experts (a list of ints) -> their tensors on the device, keyed like the others
(offload/weights/expert_stager.py); the dict of a layer on the GPU whose experts the CPU computes carries, under
HOST_STAGING, the pinned buffers their rows cross in (offload/attention/host.py). Layer and experts dicts are
keyed by the tensor name relative to `arch.layer_prefix(i)`
("self_attn.q_proj.weight", "mlp.experts.3.up_proj.weight"); the other items by the full
checkpoint name less `arch.checkpoint_prefix` ("model.norm.weight" also inside a multimodal checkpoint). With tied embeddings, acquire("lm_head") returns {"lm_head.weight": <embedding table>}.
"""
from __future__ import annotations

from typing import Protocol, Union

import torch

from offload.weights.prefetch import TransferStats
from placement.architecture import Architecture

Item = Union[int, str, tuple]
NAMED_ITEMS = ("embedding", "final_norm", "lm_head")
EXPERTS = "experts"
ROUTED_EXPERTS = "routed_experts"     # a layer dict's fetch of its routed experts (streamed on demand)
HOST_STAGING = "host_staging"         # a layer dict's staging for routed experts computed on the host
LM_HEAD = "lm_head.weight"


class WeightSource(Protocol):
    """Everything the engine calls on the weights, whatever memory they live in (offload/weights/placed.py)."""

    def acquire(self, item: Item) -> dict[str, torch.Tensor]: ...

    def release(self, item: Item) -> None: ...

    def skip(self, item: Item) -> None:
        """Pass over the item this step (its turn in the fixed order comes and goes unused)."""

    def announce_skips(self, item: Item, count: int) -> None:
        """The next `count` uses of the item will be skip()s (a streamed source need not copy it)."""

    def is_streamed(self, item: Item) -> bool:
        """True when the item reaches the device through the prefetch ring."""

    def host_tensors(self, item: Item) -> dict:
        """A streamed item's weights where they lie in host memory, to compute it on the CPU (KeyError for an
        item not kept there)."""

    @property
    def prefetch_depth(self) -> int:
        """Ring slots (0 when nothing is streamed): how many streamed items can be held at once."""

    @property
    def stats(self) -> TransferStats:
        """Host->device copies since the last reset_stats()."""

    def reset(self, next_item: Item | None = None) -> None:
        """Back to a consistent cycle after an interrupted step."""

    def close(self) -> None:
        """Free everything (idempotent); acquire afterwards raises."""


def experts_item(layer: int) -> tuple[str, int]:
    """The item of MoE layer `layer`'s routed experts, when they are placed apart from the layer."""
    return (EXPERTS, layer)


def weight_items(arch: Architecture, cpu_experts=()) -> list[Item]:
    """Every item in the order the engine uses them: embedding, layers 0..N-1 (each followed by its experts'
    item when the layer is in `cpu_experts`), final_norm, lm_head."""
    layers = [item for i in range(arch.num_layers) for item in ((i, experts_item(i)) if i in cpu_experts else (i,))]
    return ["embedding", *layers, "final_norm", "lm_head"]


def item_tensors(arch: Architecture, item: Item, cpu_experts=()) -> dict[str, str]:
    """Key in the acquired dict -> checkpoint tensor name, for one item (a layer in `cpu_experts` without its
    routed experts: they are the item experts_item(layer))."""
    if isinstance(item, tuple):
        kind, layer = item
        if kind != EXPERTS or layer not in arch.moe_layers:
            raise ValueError(f"unknown weight item {item!r}; experts items are ({EXPERTS!r}, a MoE layer)")
        prefix = arch.layer_prefix(layer)
        return {name[len(prefix):]: name for e in range(arch.num_experts) for name in arch.expert_tensors(layer, e)}
    if isinstance(item, int):
        if not 0 <= item < arch.num_layers:
            raise ValueError(f"layer {item} out of range (model has {arch.num_layers} layers)")
        prefix = arch.layer_prefix(item)
        apart = {name for e in range(arch.num_experts) for name in arch.expert_tensors(item, e)} \
            if item in cpu_experts else set()
        return {name[len(prefix):]: name for name in arch.layer_tensors(item) if name not in apart}
    if item == "embedding":
        names = arch.embedding_tensors()
    elif item == "final_norm":
        names = arch.final_norm_tensors()
    elif item == "lm_head":
        if arch.tie_word_embeddings:   # the head IS the token embedding table
            return {LM_HEAD: arch.token_table}
        names = arch.lm_head_tensors()
    else:
        raise ValueError(f"unknown weight item {item!r}; expected a layer index or one of {NAMED_ITEMS}")
    # keys are the usual names ("model.norm.weight"), whatever prefix the checkpoint adds to them
    prefix = arch.checkpoint_prefix
    return {name[len(prefix):]: name for name in names}
